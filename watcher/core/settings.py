"""Typed settings from the environment, validated once at start-up.

Every value has one environment variable; the README's settings table lists them all.
A bad value stops start-up with one line per variable (exit code 2) and never echoes the
value itself, because some of them are secrets.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import textwrap
import uuid
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from watcher.core.logs import LOG_FORMATS

MiB = 1024 * 1024


class EngineName(StrEnum):
    CPU = "cpu"
    PADDLEOCR_VL = "paddleocr-vl"
    OPENAI_VLM = "openai-vlm"


class TextLayerMode(StrEnum):
    """Where a PDF page's text comes from: its own text layer when it can be trusted
    (`auto`), always the engine (`ocr`), or never the engine (`text`)."""

    AUTO = "auto"
    OCR = "ocr"
    TEXT = "text"


class DeletedSourceResults(StrEnum):
    KEEP = "keep"
    DELETE = "delete"


class Addressing(StrEnum):
    PATH = "path"
    VIRTUAL = "virtual"
    AUTO = "auto"


class ClaimMode(StrEnum):
    LEASE = "lease"
    SHARD = "shard"


class SourceAction(StrEnum):
    KEEP = "keep"
    DELETE = "delete"
    MOVE = "move"


# The PaddleOCR-VL releases the pinned PaddleOCR (3.7, see the Dockerfile) can run:
# pipeline version -> (the served model name its client asks for, the weights to serve).
# start.sh derives the same defaults from WATCHER_PIPELINE_VERSION; a test holds them together.
PADDLEOCR_VL_MODELS = {
    "v1": ("PaddleOCR-VL-0.9B", "PaddlePaddle/PaddleOCR-VL"),
    "v1.5": ("PaddleOCR-VL-1.5-0.9B", "PaddlePaddle/PaddleOCR-VL-1.5"),
    "v1.6": ("PaddleOCR-VL-1.6-0.9B", "PaddlePaddle/PaddleOCR-VL-1.6"),
}
DEFAULT_PIPELINE_VERSION = "v1.6"

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class Settings(BaseSettings):
    """All settings; field aliases are the environment variable names."""

    model_config = SettingsConfigDict(
        env_prefix="",
        case_sensitive=True,
        populate_by_name=True,
        extra="ignore",
        secrets_dir=os.environ.get("WATCHER_SECRETS_DIR") or None,
        # The docstring under each field is its meaning: `watcher run --help` and the
        # README's settings tables are generated from them (settings_table).
        use_attribute_docstrings=True,
    )

    # --- S3 (names operators already use) ---
    s3_endpoint: str = Field(alias="CLOUDRU_S3_ENDPOINT")
    """S3 endpoint URL, `http://` or `https://`"""
    s3_bucket: str = Field(alias="CLOUDRU_S3_BUCKET", min_length=3, max_length=63)
    """the bucket watched and written to"""
    s3_access_key: SecretStr = Field(alias="CLOUDRU_S3_ACCESS_KEY")
    """access key id; Cloud.ru form `<tenant_id>:<key_id>`"""
    s3_secret_key: SecretStr = Field(alias="CLOUDRU_S3_SECRET_KEY")
    """secret key; never logged, never in `/health` or results"""
    s3_region: str = Field(default="ru-central-1", alias="CLOUDRU_S3_REGION")
    """signing region"""
    s3_addressing: Addressing = Field(default=Addressing.PATH, alias="CLOUDRU_S3_ADDRESSING")
    """`path`, `virtual` or `auto` bucket addressing"""
    s3_connect_timeout: PositiveFloat = Field(default=5.0, alias="WATCHER_S3_CONNECT_TIMEOUT")
    """seconds to connect"""
    s3_read_timeout: PositiveFloat = Field(default=60.0, alias="WATCHER_S3_READ_TIMEOUT")
    """seconds to wait for a response"""
    s3_max_attempts: PositiveInt = Field(default=5, alias="WATCHER_S3_MAX_ATTEMPTS")
    """tries per S3 call (backoff with jitter) before S3 counts as unavailable"""
    s3_max_pool: PositiveInt = Field(default=32, alias="WATCHER_S3_MAX_POOL")
    """HTTP connections to S3"""

    # --- layout in the bucket ---
    input_prefix: str = Field(default="input/", alias="WATCHER_INPUT_PREFIX")
    """where documents are dropped"""
    output_prefix: str = Field(default="output/", alias="WATCHER_OUTPUT_PREFIX")
    """where results go (must not overlap the input prefix)"""
    lease_prefix: str = Field(default=".watcher/leases/", alias="WATCHER_LEASE_PREFIX")
    """claim objects of running replicas"""
    source_action: SourceAction = Field(default=SourceAction.KEEP, alias="WATCHER_SOURCE_ACTION")
    """after success: `keep`, `delete` or `move` the source (failed sources are always kept)"""
    done_prefix: str = Field(default="done/", alias="WATCHER_DONE_PREFIX")
    """where `move` puts sources"""
    results_of_deleted_sources: DeletedSourceResults = Field(
        default=DeletedSourceResults.KEEP, alias="WATCHER_RESULTS_OF_DELETED_SOURCES"
    )
    """what happens to a result when its source is deleted: `keep` it, or `delete` it (seen
    missing on two listings in a row; only with `WATCHER_SOURCE_ACTION=keep`)"""
    assets: bool = Field(default=True, alias="WATCHER_ASSETS")
    """write the figures a VLM engine finds (images, charts, seals) as PNGs under `<result>.assets/`,
    linked from the Markdown"""
    assets_max_mb: Annotated[int, Field(ge=1, le=4096)] = Field(default=64, alias="WATCHER_ASSETS_MAX_MB")
    """the most figure assets one document writes, in MB"""
    chunks: bool = Field(default=False, alias="WATCHER_CHUNKS")
    """also write `<result>.chunks.jsonl`: chunks for vector databases (never across a heading, never
    splitting a table)"""
    chunk_tokens: Annotated[int, Field(ge=32, le=8192)] = Field(default=512, alias="WATCHER_CHUNK_TOKENS")
    """the most tokens (words and punctuation marks) in a chunk"""
    outputs: Annotated[str, Field(pattern=r"^\s*(docling)?(\s*,\s*docling)*\s*$")] = Field(
        default="", alias="WATCHER_OUTPUTS")
    """more formats beside each result, comma-separated: `docling` (`<result>.docling.json`, a
    DoclingDocument; needs the `docling` extra)"""

    # --- discovery and claims ---
    poll_interval: PositiveFloat = Field(default=5.0, alias="WATCHER_POLL_INTERVAL")
    """seconds between listings of the input prefix (longer while the listing budget
    needs it; minutes are fine with a notification source on)"""
    list_requests_per_second: PositiveFloat = Field(
        default=100.0, alias="WATCHER_LIST_REQUESTS_PER_SECOND"
    )
    """listing budget of the whole fleet: list requests per second at most (Cloud.ru allows
    1,000 per bucket); listings are paced to it, so a large bucket's poll takes longer and the
    next one starts later"""
    shared_listing: bool = Field(default=True, alias="WATCHER_SHARED_LISTING")
    """one replica (holding a lease) lists for the fleet and shares what it found in a manifest
    object that the others read; `false`: every replica lists (the budget is then per replica)"""
    claim_mode: ClaimMode = Field(default=ClaimMode.LEASE, alias="WATCHER_CLAIM_MODE")
    """`lease` (conditional PUT) or `shard` (key-hash split, for stores without conditional writes)"""
    lease_seconds: Annotated[float, Field(ge=10)] = Field(
        default=120.0, alias="WATCHER_LEASE_SECONDS"
    )
    """a lease's lifetime; renewed every third of it while working"""
    shard_index: Annotated[int, Field(ge=0)] = Field(default=0, alias="WATCHER_SHARD_INDEX")
    """this replica's shard in `shard` mode, from 0; with several shards and none given, the
    StatefulSet pod ordinal (`<name>-<n>` of WATCHER_REPLICA_ID or the host name)"""
    shard_count: PositiveInt = Field(default=1, alias="WATCHER_SHARD_COUNT")
    """number of shards (replicas) in `shard` mode"""
    replica_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}",
        alias="WATCHER_REPLICA_ID",
    )
    """written into leases; set it to the pod name (StatefulSet) so that a restarted container takes its
    own leases back at once"""

    # --- work and concurrency ---
    engine: EngineName = Field(default=EngineName.CPU, alias="WATCHER_ENGINE")
    """`cpu` (Tesseract, offline), `paddleocr-vl` or `openai-vlm` (GPU, see below)"""
    max_inflight_documents: PositiveInt = Field(default=2, alias="WATCHER_MAX_INFLIGHT_DOCUMENTS")
    """documents processed at once, at most; with a VLM engine the number in flight follows the engine's
    adaptive request limit below this ceiling"""
    page_concurrency: PositiveInt = Field(default=2, alias="WATCHER_PAGE_CONCURRENCY")
    """pages of one document in flight (and in memory) at once, at most"""
    engine_concurrency: PositiveInt = Field(default=1, alias="WATCHER_ENGINE_CONCURRENCY")
    """engine worker processes for `cpu` and `paddleocr-vl` (CPU engine: each uses all cores;
    `paddleocr-vl`: one pipeline each, with its own layout model on the GPU)"""
    queue_size: PositiveInt = Field(default=1000, alias="WATCHER_QUEUE_SIZE")
    """discovered documents queued in memory; the rest wait for the next poll"""
    max_attempts: PositiveInt = Field(default=3, alias="WATCHER_MAX_ATTEMPTS")
    """failed attempts on one document (engine hung, died or raised; or the whole pod died while on it)
    before it gets `engine_failed`; counted in S3"""
    engine_retry_seconds: PositiveFloat = Field(default=60.0, alias="WATCHER_ENGINE_RETRY_SECONDS")
    """after a failed warm-up, try again this often"""
    drain_seconds: Annotated[float, Field(ge=0)] = Field(default=30.0, alias="WATCHER_DRAIN_SECONDS")
    """grace period on SIGTERM to finish in-flight documents"""
    engine_timeout: PositiveFloat = Field(default=600.0, alias="WATCHER_ENGINE_TIMEOUT")
    """seconds for one call to an engine worker; past it the worker is killed and replaced, and the page's
    document is charged one attempt"""
    # The GPU image's PaddleOCR-VL worker settles near 3-4 GB of host memory; a worker
    # far above that is leaking (0 turns the check off).
    engine_max_rss_mb: Annotated[int, Field(ge=0)] = Field(
        default=12288, alias="WATCHER_ENGINE_MAX_RSS_MB"
    )
    """an engine worker whose resident memory passes this is replaced after its current call (`0`: never)"""
    decode_workers: PositiveInt = Field(default=2, alias="WATCHER_DECODE_WORKERS")
    """worker processes that open, render and read the text layer of documents (PDFium, Pillow)"""
    decode_timeout: PositiveFloat = Field(default=120.0, alias="WATCHER_DECODE_TIMEOUT")
    """seconds for one decoding call (opening a document, rendering a page, reading its text layer); past
    it the decode worker is killed and replaced, and the page (or document) is charged like an engine crash"""
    # A page at WATCHER_MAX_PAGE_PIXELS needs about 0.5 GB as PDFium's bitmap and Pillow's
    # image; the cap leaves room for that and stops a decompression bomb well before the
    # node's memory.
    decode_max_mb: Annotated[int, Field(ge=0)] = Field(default=4096, alias="WATCHER_DECODE_MAX_MB")
    """address space each decode worker may use (`0`: no cap); an allocation past it fails there, not in the
    daemon"""

    # --- document limits ---
    max_object_bytes: PositiveInt = Field(default=200 * MiB, alias="WATCHER_MAX_OBJECT_BYTES")
    """larger objects get `too_large` without being downloaded"""
    max_pages: PositiveInt = Field(default=1000, alias="WATCHER_MAX_PAGES")
    """more pages get `too_many_pages`"""
    max_page_pixels: PositiveInt = Field(default=60_000_000, alias="WATCHER_MAX_PAGE_PIXELS")
    """bigger images get `page_too_large` (decompression bombs); bigger PDF pages are rendered smaller"""
    render_dpi: Annotated[int, Field(ge=36, le=600)] = Field(default=150, alias="WATCHER_RENDER_DPI")
    """PDF rasterisation resolution"""
    temp_dir: str | None = Field(default=None, alias="WATCHER_TEMP_DIR")
    """where sources are downloaded while processed (removed after)"""

    # --- reading text ---
    text_layer: TextLayerMode = Field(default=TextLayerMode.AUTO, alias="WATCHER_TEXT_LAYER")
    """where a PDF page's text comes from: `auto` (its own text layer when it can be trusted, else OCR),
    `ocr` (always OCR), `text` (never OCR a PDF page)"""
    ocr_languages: Annotated[str, Field(pattern=r"^[a-z_]+(\+[a-z_]+)*$")] = Field(
        default="rus+eng", alias="WATCHER_OCR_LANGUAGES"
    )
    """Tesseract languages of the `cpu` engine, `+`-separated, the first preferred (each needs Debian's
    `tesseract-ocr-<lang>`)"""
    tessdata_dir: str | None = Field(default=None, alias="WATCHER_TESSDATA_DIR")
    """where Tesseract's `<lang>.traineddata` files are, if not in the usual places"""

    # --- HTTP and logs ---
    http_host: str = Field(default="0.0.0.0", alias="WATCHER_HTTP_HOST")
    """address the health server (/health, /ready, /metrics) listens on"""
    http_port: Annotated[int, Field(ge=0, le=65535)] = Field(default=8081, alias="WATCHER_HTTP_PORT")
    """port of the health server (0: any free port)"""
    status_page: bool = Field(default=False, alias="WATCHER_STATUS_PAGE")
    """serve a live status page at `/` on the health port (backlog, throughput, engine,
    documents in progress and the last ones done, with their names: when
    WATCHER_WEBHOOK_TOKEN is set it asks for that token); `watcher demo` turns it on"""
    log_level: str = Field(default="INFO", alias="WATCHER_LOG_LEVEL")
    """`DEBUG`, `INFO`, `WARNING`, `ERROR`"""
    log_format: str = Field(default="auto", alias="WATCHER_LOG_FORMAT")
    """`json` (one event per line), `human` (one line per document, then warnings and
    errors), `console` (every event, readable) or `auto`: `human` when stdout is a
    terminal, `json` otherwise"""

    # --- notifications ---
    webhook_token: SecretStr | None = Field(default=None, alias="WATCHER_WEBHOOK_TOKEN")
    """bearer token that S3 event notifications must send to `POST /events` on the health
    port; unset: the endpoint is off"""
    webhook_max_bytes: PositiveInt = Field(default=1024 * 1024, alias="WATCHER_WEBHOOK_MAX_BYTES")
    """largest notification body accepted (bigger ones get 413)"""
    sqs_queue_url: str | None = Field(default=None, alias="WATCHER_SQS_QUEUE_URL")
    """URL of an SQS-compatible queue that receives the bucket's ObjectCreated notifications;
    unset: no queue is read (the poll still finds everything)"""
    sqs_endpoint: str | None = Field(default=None, alias="WATCHER_SQS_ENDPOINT")
    """endpoint of the SQS-compatible service; unset: the AWS endpoint of `CLOUDRU_S3_REGION`"""
    sqs_region: str | None = Field(default=None, alias="WATCHER_SQS_REGION")
    """the queue's region; unset: `CLOUDRU_S3_REGION`"""
    sqs_access_key: SecretStr | None = Field(default=None, alias="WATCHER_SQS_ACCESS_KEY")
    """access key for the queue; unset: the S3 access key"""
    sqs_secret_key: SecretStr | None = Field(default=None, alias="WATCHER_SQS_SECRET_KEY")
    """secret key for the queue; unset: the S3 secret key"""
    sqs_visibility_seconds: Annotated[int, Field(ge=10, le=43200)] = Field(
        default=120, alias="WATCHER_SQS_VISIBILITY_SECONDS"
    )
    """how long a received message stays hidden from other readers; extended every third of it
    while its document is in progress"""
    callback_url: str | None = Field(default=None, alias="WATCHER_CALLBACK_URL")
    """where to POST a JSON notice for each finished document (result or error record);
    retried with backoff, never holding a document back"""
    callback_secret: SecretStr | None = Field(default=None, alias="WATCHER_CALLBACK_SECRET")
    """key of the HMAC-SHA256 signature over each callback body (`X-Watcher-Signature`)"""

    # --- VLM engines ---
    # Read by the openai-vlm and paddleocr-vl engines only; harmless for the CPU engine.
    vlm_url: str = Field(default="http://127.0.0.1:8080/v1", alias="WATCHER_VLM_URL")
    """the OpenAI-compatible VLM server (vLLM); its `/health` is probed beside it"""
    # Empty: the served name of WATCHER_PIPELINE_VERSION's model (PADDLEOCR_VL_MODELS).
    vlm_model: str = Field(default="", alias="WATCHER_VLM_MODEL")
    """model name to request; must equal vLLM's `--served-model-name`"""
    vlm_prompt_preset: Literal["paddleocr-vl", "granite-docling"] = Field(
        default="paddleocr-vl", alias="WATCHER_VLM_PROMPT_PRESET"
    )
    """`paddleocr-vl` (prompt `OCR:`) or `granite-docling` (DocTags → blocks with boxes + Markdown)"""
    vlm_prompt: str | None = Field(default=None, alias="WATCHER_VLM_PROMPT")
    """override the prompt text"""
    # An upper bound: the requests in flight adapt to the server (engines/capacity.py).
    vlm_max_concurrency: PositiveInt = Field(default=512, alias="WATCHER_VLM_MAX_CONCURRENCY")
    """upper bound of the adaptive number of requests in flight to the VLM server; `paddleocr-vl`
    shares it out between its pipelines as `vl_rec_max_concurrency`"""
    vlm_timeout: PositiveFloat = Field(default=120.0, alias="WATCHER_VLM_TIMEOUT")
    """seconds per request"""
    vlm_max_retries: Annotated[int, Field(ge=0, le=20)] = Field(
        default=3, alias="WATCHER_VLM_MAX_RETRIES"
    )
    """retries of a request on 5xx, 429, connection error or timeout"""
    vlm_max_tokens: PositiveInt = Field(default=4096, alias="WATCHER_VLM_MAX_TOKENS")
    """`max_tokens` per page"""
    vlm_startup_timeout: PositiveFloat = Field(default=900.0, alias="WATCHER_VLM_STARTUP_TIMEOUT")
    """seconds warm-up waits for the VLM server's `/health`"""
    vlm_api_key: SecretStr | None = Field(default=None, alias="WATCHER_VLM_API_KEY")
    """sent as a Bearer token; treated as a secret"""
    # start.sh exports it (1 or 0) after deciding whether to start a VLM server beside the
    # daemon; read only by /health.
    vlm_managed: bool = Field(default=False, alias="WATCHER_VLM_MANAGED")
    """set by start.sh: `1` when it started the VLM server beside the daemon and restarts it
    when it exits, so that the server is this container's to keep alive and `/health` fails
    once it stays unreachable past `WATCHER_VLM_UNREACHABLE_LIMIT`; `0`: the server is someone
    else's (another container or host) and only `/ready` reports it"""
    vlm_unreachable_limit: PositiveFloat = Field(default=1200.0, alias="WATCHER_VLM_UNREACHABLE_LIMIT")
    """with `WATCHER_VLM_MANAGED=1`: seconds the VLM server may stay unreachable before `/health`
    fails, so that the liveness probe restarts the container; the default is start.sh's longest
    wait between restarts (`WATCHER_VLM_RESTART_MAX_DELAY`, 300 s) plus the longest vLLM start
    with its model load (`WATCHER_VLM_STARTUP_TIMEOUT`, 900 s), so that only a server that
    cannot come back by itself costs the pod a restart"""
    pipeline_version: str = Field(default=DEFAULT_PIPELINE_VERSION, alias="WATCHER_PIPELINE_VERSION")
    """the PaddleOCR-VL release: `PaddleOCRVL(pipeline_version=...)`, `v1`, `v1.5`, `v1.6`; picks the
    default served name and weights (daemon and start.sh alike)"""
    layout_device: str = Field(default="gpu", alias="WATCHER_LAYOUT_DEVICE")
    """device of PaddleOCR-VL's in-process layout model (`gpu:0`, `cpu`, ...)"""

    @field_validator("vlm_url")
    @classmethod
    def _vlm_url_shape(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("vlm_prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str | None) -> str | None:
        # An empty override would silently send no instruction; treat it as "use the preset".
        return value if value and value.strip() else None

    @field_validator("callback_url", "sqs_endpoint", "sqs_queue_url")
    @classmethod
    def _callback_url_shape(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value or None

    @field_validator("vlm_api_key", "webhook_token", "callback_secret", "sqs_access_key", "sqs_secret_key")
    @classmethod
    def _api_key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value().strip() else None

    @field_validator("pipeline_version")
    @classmethod
    def _pipeline_version(cls, value: str) -> str:
        # The values PaddleOCR 3.7's PaddleOCRVL accepts.
        if value not in PADDLEOCR_VL_MODELS:
            raise ValueError(f"must be one of {', '.join(PADDLEOCR_VL_MODELS)}")
        return value

    @field_validator("layout_device")
    @classmethod
    def _layout_device(cls, value: str) -> str:
        if not re.fullmatch(r"(cpu|gpu|npu|xpu|mlu|dcu|gcu)(:\d+(,\d+)*)?", value):
            raise ValueError("must look like cpu, gpu or gpu:0")
        return value

    # --- end of VLM engines ---

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint_is_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("s3_access_key", "s3_secret_key")
    @classmethod
    def _not_blank(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("input_prefix", "output_prefix", "lease_prefix", "done_prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        if value.startswith("/"):
            raise ValueError("must not start with '/'")
        if value and not value.endswith("/"):
            value += "/"
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return value

    @field_validator("log_format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value not in LOG_FORMATS:
            raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
        return value

    @model_validator(mode="after")
    def _shard_from_pod_ordinal(self) -> Settings:
        # A StatefulSet names its pods <name>-<ordinal>: with several shards and no index
        # given, the ordinal is this replica's shard.
        if self.shard_count > 1 and "shard_index" not in self.model_fields_set:
            pod = self.replica_id if "replica_id" in self.model_fields_set else socket.gethostname()
            ordinal = re.fullmatch(r".*-(\d+)", pod)
            if ordinal:
                self.shard_index = int(ordinal.group(1))
        return self

    @model_validator(mode="after")
    def _prefixes_disjoint(self) -> Settings:
        prefixes = {
            "WATCHER_OUTPUT_PREFIX": self.output_prefix,
            "WATCHER_LEASE_PREFIX": self.lease_prefix,
        }
        if self.source_action is SourceAction.MOVE:
            prefixes["WATCHER_DONE_PREFIX"] = self.done_prefix
        problems = [
            f"{name} must not overlap WATCHER_INPUT_PREFIX"
            for name, other in prefixes.items()
            if other.startswith(self.input_prefix) or self.input_prefix.startswith(other)
        ]
        if self.shard_index >= self.shard_count:
            problems.append("WATCHER_SHARD_INDEX must be below WATCHER_SHARD_COUNT")
        if (self.results_of_deleted_sources is DeletedSourceResults.DELETE
                and self.source_action is not SourceAction.KEEP):
            # `delete` and `move` take sources away on purpose, after their result is out.
            problems.append("WATCHER_RESULTS_OF_DELETED_SOURCES=delete needs WATCHER_SOURCE_ACTION=keep")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @model_validator(mode="after")
    def _served_model(self) -> Settings:
        if not self.vlm_model.strip():
            self.vlm_model = PADDLEOCR_VL_MODELS[self.pipeline_version][0]
        return self

    @model_validator(mode="after")
    def _fill_a_vlm_server(self) -> Settings:
        # With a VLM engine the pages in flight follow what the engine asks for (its
        # adaptive request limit), so these two are only ceilings; the CPU defaults would
        # cap a large GPU far below its capacity (bench/vlm_utilisation.py).
        if self.engine is EngineName.CPU:
            return self
        if "page_concurrency" not in self.model_fields_set:
            self.page_concurrency = 8
        if "max_inflight_documents" not in self.model_fields_set:
            self.max_inflight_documents = self.vlm_max_concurrency
        if self.engine is EngineName.PADDLEOCR_VL and "engine_concurrency" not in self.model_fields_set:
            # One pipeline sends a call's blocks in one wave and then detects the next
            # call's layout while the server idles; a second one fills that gap.
            self.engine_concurrency = 2
        return self

    def output_formats(self) -> set[str]:
        return {part.strip() for part in self.outputs.split(",") if part.strip()}

    @model_validator(mode="after")
    def _docling_installed(self) -> Settings:
        if "docling" in self.output_formats() and importlib.util.find_spec("docling_core") is None:
            raise ValueError("WATCHER_OUTPUTS=docling needs docling-core: install the watcher with "
                             "its `docling` extra (pip install 'watcher[docling]'), or leave docling out")
        return self

    def secrets(self) -> list[str]:
        """Values that must never reach logs, results or /health."""
        values = [self.s3_secret_key.get_secret_value(), self.s3_access_key.get_secret_value()]
        if self.vlm_api_key is not None:  # VLM engines
            values.append(self.vlm_api_key.get_secret_value())
        if self.webhook_token is not None:
            values.append(self.webhook_token.get_secret_value())
        if self.callback_secret is not None:
            values.append(self.callback_secret.get_secret_value())
        for key in (self.sqs_access_key, self.sqs_secret_key):
            if key is not None:
                values.append(key.get_secret_value())
        return values


# --- the settings, documented (`watcher run --help`, the README's tables) ---

# Defaults that the field's own value does not say: computed, or set by the engine.
_SHOWN_DEFAULTS = {
    "replica_id": "host name + random",
    "max_inflight_documents": "`2` (VLM engines: `WATCHER_VLM_MAX_CONCURRENCY`)",
    "page_concurrency": "`2` (VLM engines: `8`)",
    "engine_concurrency": "`1` (`paddleocr-vl`: `2`)",
    "outputs": "none",
    "temp_dir": "system temp",
    "tessdata_dir": "Debian's tessdata",
    "vlm_model": f"`{PADDLEOCR_VL_MODELS[DEFAULT_PIPELINE_VERSION][0]}` (the served name of "
    "`WATCHER_PIPELINE_VERSION`'s model)",
    "vlm_prompt": "preset's",
    "vlm_managed": "`0` (start.sh: `1` when it started the server)",
}
# Read by the VLM engines only: the README lists them in a table of their own.
_VLM_ONLY = ("pipeline_version", "layout_device")
# Read before the settings are: where the values may come from.
_OUTSIDE_THE_MODEL = [("WATCHER_SECRETS_DIR", "unset", "directory of files named like the variables above")]


def _shown_default(name: str, info: FieldInfo) -> str:
    if name in _SHOWN_DEFAULTS:
        return _SHOWN_DEFAULTS[name]
    if info.is_required():
        return "required"
    value = info.default
    if value is None:
        return "unset"
    if isinstance(value, StrEnum):
        value = value.value
    if isinstance(value, bool):
        # As the variable is written (WATCHER_STATUS_PAGE=true), not Python's True.
        value = str(value).lower()
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def settings_rows(vlm: bool = False) -> list[tuple[str, str, str]]:
    """(variable, default, meaning) of every setting, from the model itself."""
    rows = [
        (str(info.alias), _shown_default(name, info), " ".join((info.description or "").split()))
        for name, info in Settings.model_fields.items()
        if (name.startswith("vlm_") or name in _VLM_ONLY) == vlm
    ]
    return rows if vlm else rows + _OUTSIDE_THE_MODEL


def settings_table(vlm: bool = False) -> str:
    """The README's settings table (held to the model by a test)."""
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | {default} | {meaning} |" for name, default, meaning in settings_rows(vlm)]
    return "\n".join(lines)


def settings_help() -> str:
    """Every setting with its default and meaning, for `watcher run --help`."""
    parts = ["settings (environment variables):"]
    for vlm in (False, True):
        if vlm:
            parts.append("\nread by the VLM engines (paddleocr-vl, openai-vlm) only:")
        for name, default, meaning in settings_rows(vlm):
            shown = "(required)" if default == "required" else f"(default: {default.replace('`', '')})"
            parts.append(f"  {name} {shown}")
            parts.append(textwrap.fill(meaning.replace("`", ""), 88, initial_indent="      ",
                                       subsequent_indent="      "))
    return "\n".join(parts)


class SettingsError(Exception):
    """Start-up configuration is invalid; `lines` name each variable and the problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def _alias_of(field: str) -> str:
    info = Settings.model_fields.get(field)
    if info is not None and isinstance(info.alias, str):
        return info.alias
    return field


def _field_of(name: str) -> str:
    """The field's name, whether pydantic reports it by name or by alias."""
    if name in Settings.model_fields:
        return name
    return next((f for f, info in Settings.model_fields.items() if info.alias == name), name)


# Harmless values for required settings that are missing or bad, so that the checks
# across settings still run in the same round.
_STAND_INS = {"s3_endpoint": "http://stand-in", "s3_bucket": "stand-in",
              "s3_access_key": "stand-in", "s3_secret_key": "stand-in"}


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; raise SettingsError with one line per problem,
    every problem in one round."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines, bad = _problems(exc)
    if bad and not any(line.startswith("invalid settings:") for line in lines):
        # Checks across settings run only when each setting is valid on its own: run them
        # again with the bad ones replaced, and keep what does not involve those.
        stand_ins = {name: _STAND_INS.get(name, Settings.model_fields[name].default) for name in bad}
        try:
            Settings(**{**overrides, **stand_ins})
        except ValidationError as again:
            bad_names = {_alias_of(name) for name in bad}
            lines += [line for line in _problems(again)[0] if line.startswith("invalid settings:")
                      and not any(name in line for name in bad_names)]
    raise SettingsError(lines)


def _problems(exc: ValidationError) -> tuple[list[str], set[str]]:
    """One line per problem, and the fields that were bad on their own."""
    lines: list[str] = []
    bad: set[str] = set()
    for err in exc.errors(include_input=False, include_url=False):
        loc = err.get("loc") or ()
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "missing":
            message = "is required but not set"
        if loc:
            bad.add(_field_of(str(loc[0])))
            lines.append(f"invalid setting {_alias_of(str(loc[0]))}: {message}")
        else:
            lines += [f"invalid settings: {part}" for part in message.splitlines()]
    return lines, bad


__all__ = [
    "Addressing",
    "ClaimMode",
    "DeletedSourceResults",
    "EngineName",
    "Settings",
    "SettingsError",
    "SourceAction",
    "load_settings",
]

"""Typed settings from the environment, validated once at start-up.

Every value has one environment variable; the README's settings table lists them all.
A bad value stops start-up with one line per variable (exit code 2) and never echoes the
value itself, because some of them are secrets.
"""

from __future__ import annotations

import os
import re
import socket
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
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    )

    # --- S3 (names operators already use) ---
    s3_endpoint: str = Field(alias="CLOUDRU_S3_ENDPOINT")
    s3_bucket: str = Field(alias="CLOUDRU_S3_BUCKET", min_length=3, max_length=63)
    s3_access_key: SecretStr = Field(alias="CLOUDRU_S3_ACCESS_KEY")
    s3_secret_key: SecretStr = Field(alias="CLOUDRU_S3_SECRET_KEY")
    s3_region: str = Field(default="ru-central-1", alias="CLOUDRU_S3_REGION")
    s3_addressing: Addressing = Field(default=Addressing.PATH, alias="CLOUDRU_S3_ADDRESSING")
    s3_connect_timeout: PositiveFloat = Field(default=5.0, alias="WATCHER_S3_CONNECT_TIMEOUT")
    s3_read_timeout: PositiveFloat = Field(default=60.0, alias="WATCHER_S3_READ_TIMEOUT")
    s3_max_attempts: PositiveInt = Field(default=5, alias="WATCHER_S3_MAX_ATTEMPTS")
    s3_max_pool: PositiveInt = Field(default=32, alias="WATCHER_S3_MAX_POOL")

    # --- layout in the bucket ---
    input_prefix: str = Field(default="input/", alias="WATCHER_INPUT_PREFIX")
    output_prefix: str = Field(default="output/", alias="WATCHER_OUTPUT_PREFIX")
    lease_prefix: str = Field(default=".watcher/leases/", alias="WATCHER_LEASE_PREFIX")
    source_action: SourceAction = Field(default=SourceAction.KEEP, alias="WATCHER_SOURCE_ACTION")
    done_prefix: str = Field(default="done/", alias="WATCHER_DONE_PREFIX")

    # --- discovery and claims ---
    poll_interval: PositiveFloat = Field(default=5.0, alias="WATCHER_POLL_INTERVAL")
    claim_mode: ClaimMode = Field(default=ClaimMode.LEASE, alias="WATCHER_CLAIM_MODE")
    lease_seconds: Annotated[float, Field(ge=10)] = Field(
        default=120.0, alias="WATCHER_LEASE_SECONDS"
    )
    shard_index: Annotated[int, Field(ge=0)] = Field(default=0, alias="WATCHER_SHARD_INDEX")
    shard_count: PositiveInt = Field(default=1, alias="WATCHER_SHARD_COUNT")
    replica_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}",
        alias="WATCHER_REPLICA_ID",
    )

    # --- work and concurrency ---
    engine: EngineName = Field(default=EngineName.CPU, alias="WATCHER_ENGINE")
    max_inflight_documents: PositiveInt = Field(default=2, alias="WATCHER_MAX_INFLIGHT_DOCUMENTS")
    page_concurrency: PositiveInt = Field(default=2, alias="WATCHER_PAGE_CONCURRENCY")
    engine_concurrency: PositiveInt = Field(default=1, alias="WATCHER_ENGINE_CONCURRENCY")
    queue_size: PositiveInt = Field(default=1000, alias="WATCHER_QUEUE_SIZE")
    max_attempts: PositiveInt = Field(default=3, alias="WATCHER_MAX_ATTEMPTS")
    engine_retry_seconds: PositiveFloat = Field(default=60.0, alias="WATCHER_ENGINE_RETRY_SECONDS")
    drain_seconds: Annotated[float, Field(ge=0)] = Field(default=30.0, alias="WATCHER_DRAIN_SECONDS")
    engine_timeout: PositiveFloat = Field(default=600.0, alias="WATCHER_ENGINE_TIMEOUT")
    # The GPU image's PaddleOCR-VL worker settles near 3-4 GB of host memory; a worker
    # far above that is leaking (0 turns the check off).
    engine_max_rss_mb: Annotated[int, Field(ge=0)] = Field(
        default=12288, alias="WATCHER_ENGINE_MAX_RSS_MB"
    )

    # --- document limits ---
    max_object_bytes: PositiveInt = Field(default=200 * MiB, alias="WATCHER_MAX_OBJECT_BYTES")
    max_pages: PositiveInt = Field(default=1000, alias="WATCHER_MAX_PAGES")
    max_page_pixels: PositiveInt = Field(default=60_000_000, alias="WATCHER_MAX_PAGE_PIXELS")
    render_dpi: Annotated[int, Field(ge=36, le=600)] = Field(default=150, alias="WATCHER_RENDER_DPI")
    temp_dir: str | None = Field(default=None, alias="WATCHER_TEMP_DIR")

    # --- reading text ---
    text_layer: TextLayerMode = Field(default=TextLayerMode.AUTO, alias="WATCHER_TEXT_LAYER")
    ocr_languages: Annotated[str, Field(pattern=r"^[a-z_]+(\+[a-z_]+)*$")] = Field(
        default="rus+eng", alias="WATCHER_OCR_LANGUAGES"
    )
    tessdata_dir: str | None = Field(default=None, alias="WATCHER_TESSDATA_DIR")

    # --- HTTP and logs ---
    http_host: str = Field(default="0.0.0.0", alias="WATCHER_HTTP_HOST")
    http_port: Annotated[int, Field(ge=0, le=65535)] = Field(default=8081, alias="WATCHER_HTTP_PORT")
    log_level: str = Field(default="INFO", alias="WATCHER_LOG_LEVEL")
    log_format: str = Field(default="json", alias="WATCHER_LOG_FORMAT")

    # --- VLM engines ---
    # Read by the openai-vlm and paddleocr-vl engines only; harmless for the CPU engine.
    vlm_url: str = Field(default="http://127.0.0.1:8080/v1", alias="WATCHER_VLM_URL")
    # Empty: the served name of WATCHER_PIPELINE_VERSION's model (PADDLEOCR_VL_MODELS).
    vlm_model: str = Field(default="", alias="WATCHER_VLM_MODEL")
    vlm_prompt_preset: Literal["paddleocr-vl", "granite-docling"] = Field(
        default="paddleocr-vl", alias="WATCHER_VLM_PROMPT_PRESET"
    )
    vlm_prompt: str | None = Field(default=None, alias="WATCHER_VLM_PROMPT")
    # An upper bound: the requests in flight adapt to the server (engines/capacity.py).
    vlm_max_concurrency: PositiveInt = Field(default=512, alias="WATCHER_VLM_MAX_CONCURRENCY")
    vlm_timeout: PositiveFloat = Field(default=120.0, alias="WATCHER_VLM_TIMEOUT")
    vlm_max_retries: Annotated[int, Field(ge=0, le=20)] = Field(
        default=3, alias="WATCHER_VLM_MAX_RETRIES"
    )
    vlm_max_tokens: PositiveInt = Field(default=4096, alias="WATCHER_VLM_MAX_TOKENS")
    vlm_startup_timeout: PositiveFloat = Field(default=900.0, alias="WATCHER_VLM_STARTUP_TIMEOUT")
    vlm_api_key: SecretStr | None = Field(default=None, alias="WATCHER_VLM_API_KEY")
    pipeline_version: str = Field(default=DEFAULT_PIPELINE_VERSION, alias="WATCHER_PIPELINE_VERSION")
    layout_device: str = Field(default="gpu", alias="WATCHER_LAYOUT_DEVICE")

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

    @field_validator("vlm_api_key")
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
        if value not in {"json", "console"}:
            raise ValueError("must be 'json' or 'console'")
        return value

    @model_validator(mode="after")
    def _prefixes_disjoint(self) -> Settings:
        prefixes = {
            "WATCHER_OUTPUT_PREFIX": self.output_prefix,
            "WATCHER_LEASE_PREFIX": self.lease_prefix,
        }
        if self.source_action is SourceAction.MOVE:
            prefixes["WATCHER_DONE_PREFIX"] = self.done_prefix
        for name, other in prefixes.items():
            if other.startswith(self.input_prefix) or self.input_prefix.startswith(other):
                raise ValueError(f"{name} must not overlap WATCHER_INPUT_PREFIX")
        if self.shard_index >= self.shard_count:
            raise ValueError("WATCHER_SHARD_INDEX must be below WATCHER_SHARD_COUNT")
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
        return self

    def secrets(self) -> list[str]:
        """Values that must never reach logs, results or /health."""
        values = [self.s3_secret_key.get_secret_value(), self.s3_access_key.get_secret_value()]
        if self.vlm_api_key is not None:  # VLM engines
            values.append(self.vlm_api_key.get_secret_value())
        return values


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


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; raise SettingsError with one line per problem."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_input=False, include_url=False):
            loc = err.get("loc") or ()
            message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            if err.get("type") == "missing":
                message = "is required but not set"
            if loc:
                lines.append(f"invalid setting {_alias_of(str(loc[0]))}: {message}")
            else:
                lines.append(f"invalid settings: {message}")
        raise SettingsError(lines) from None


__all__ = [
    "Addressing",
    "ClaimMode",
    "EngineName",
    "Settings",
    "SettingsError",
    "SourceAction",
    "load_settings",
]

"""The paddleocr-vl engine: PaddleOCR 3.x's `PaddleOCRVL` pipeline, VLM on a vLLM server.

The layout model runs in the engine's worker processes (WATCHER_LAYOUT_DEVICE); each
layout block is then recognised by the VLM that vLLM serves at WATCHER_VLM_URL.

Pages arrive as the daemon renders them, one by one, and reach `PaddleOCRVL.predict` as
images (BGR arrays, as PaddleX reads files) in batches of up to `PaddleVlReader.
batch_pages`, so a 500-page PDF never sits in memory whole. When a document's last page
is back, `restructure_pages` runs over all of its pages' JSON: it merges tables that
continue across pages and re-levels titles (PaddleX rebuilds its blocks from that JSON).

How many pages go per call is steered from vLLM's gauges (`engines/capacity.py`): the
pipeline sends every text, table and formula block of the pages it is given to the VLM
at once (up to `vl_rec_max_concurrency`, WATCHER_VLM_MAX_CONCURRENCY split between the
workers), so a call of B pages puts about B x (blocks per page) requests on the server.
The engine keeps an `AdaptiveLimit` of requests that the server's running/waiting gauges
steer exactly as for `openai-vlm`, learns the blocks per page from the pages it reads,
and hands each worker ceil(limit / workers / blocks per page) pages per call (1..64), so
that a 64- or a 256-slot server stays full while work waits (bench/vlm_utilisation.py
--engine paddleocr-vl). Without gauges (a server with no /metrics) it keeps 4 pages per
call, the fixed batch it always had.

Paddle is heavy, native and absent from the base install: `paddleocr` is imported only
inside the supervised worker processes (watcher/engines/supervisor.py), one pipeline
per process, WATCHER_ENGINE_CONCURRENCY processes.

A layout model told to use a GPU must use it, never fall back to the CPU quietly (PaddleX's
default, with only a log warning): with a GPU layout device the workers run with PaddleX's
PADDLE_PDX_DISABLE_DEVICE_FALLBACK=True, set in their own environment (so outside the
image too), and PaddleX's error for a GPU that Paddle cannot see turns the engine
`failed` with a message naming WATCHER_LAYOUT_DEVICE, instead of a warm-up retried forever.

Mapping: every entry of the page's `parsing_res_list` becomes one block (type =
`block_label`, bbox = `block_bbox`, text = `block_content`, order = `block_order`);
tables keep their HTML (`html`), formulas their LaTeX (`latex`); the page's own JSON is
kept whole as `PageResult.raw`, which the result file carries as `pages[].raw`.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import importlib
import json
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp

from watcher.core.errors import EngineCrashed, EngineUnavailable
from watcher.core.logs import get_logger
from watcher.core.pages import Block, PageResult, RenderedPage
from watcher.core.settings import Settings
from watcher.engines import vlm_server
from watcher.engines.base import check_warm_page, synthetic_page
from watcher.engines.capacity import AdaptiveLimit, poll_server_gauges
from watcher.engines.child import EngineMisconfigured, ReaderSpec
from watcher.engines.supervisor import SupervisedEngine

log = get_logger("watcher.engine")

TABLE_LABELS = {"table"}
FORMULA_LABELS = {"formula", "display_formula", "inline_formula"}
_TITLE_LEVELS = {"doc_title": 1, "paragraph_title": 2}
# Images carry no text; their crops are referenced by the pipeline's own Markdown only.
_NO_MARKDOWN = {"image", "chart", "seal", "header_image", "footer_image", "number"}
# Blocks the pipeline does not send to the VLM: PaddleX's IMAGE_LABELS, and charts and
# seals, whose recognition we leave off (paddleocr_vl/pipeline.py, image_labels).
NOT_SENT_TO_VLM = {"image", "header_image", "footer_image", "chart", "seal"}
FIXED_BATCH_PAGES = 4
MAX_BATCH_PAGES = 64
# A guess for the first pages, before any was read: a page of running text.
INITIAL_BLOCKS_PER_PAGE = 8.0
BLOCKS_WEIGHT = 0.2


# PaddleX (paddlex/utils/flags.py, read when paddlex is imported): with it true, a model
# whose device is a GPU that Paddle cannot see raises instead of falling back to the CPU.
DEVICE_FALLBACK_FLAG = "PADDLE_PDX_DISABLE_DEVICE_FALLBACK"
# The start of what PaddleX 3.7 raises then (a RuntimeError, from
# PaddlePredictorOption.setdefault_by_model_name in
# paddlex/inference/models/runners/paddle_static/config/pp_option.py).
DEVICE_FALLBACK_ERROR = "Device fallback is disabled and the specified device (GPU) is not available"


def is_gpu_device(device: str) -> bool:
    """A device string PaddleX would check against Paddle's CUDA devices (`gpu`, `gpu:0`)."""
    return device.split(":", 1)[0].lower() == "gpu"


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment of the engine's worker processes."""
    return {DEVICE_FALLBACK_FLAG: "True"} if is_gpu_device(settings.layout_device) else {}


def is_device_unavailable(exc: BaseException) -> bool:
    """PaddleX's error for a GPU device Paddle cannot see, anywhere in the cause chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RuntimeError) and DEVICE_FALLBACK_ERROR in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextlib.contextmanager
def layout_device_errors(device: str) -> Iterator[None]:
    """Turn PaddleX's "device not available" into EngineMisconfigured naming the setting."""
    try:
        yield
    except Exception as exc:
        if not is_device_unavailable(exc):
            raise
        raise EngineMisconfigured(
            f"WATCHER_LAYOUT_DEVICE={device}: Paddle sees no usable GPU in the engine worker, "
            "so the layout model cannot run there (PaddleX: device fallback is disabled and "
            "the GPU is not available). Give the container the GPU (--gpus, nvidia.com/gpu) "
            "with a driver the image supports and paddlepaddle-gpu installed (`watcher check` "
            "reports both), or set WATCHER_LAYOUT_DEVICE=cpu to run the layout model on the "
            "CPU. Not retried: restart after the fix."
        ) from exc


def pipeline_kwargs(settings: Settings) -> dict[str, Any]:
    """Construction arguments of `paddleocr.PaddleOCRVL`, as PaddleOCR 3.x names them."""
    kwargs: dict[str, Any] = {
        "pipeline_version": settings.pipeline_version,
        "vl_rec_backend": "vllm-server",
        "vl_rec_server_url": settings.vlm_url,
        "vl_rec_api_model_name": settings.vlm_model,
        # The pipeline's own bound is per instance; with one instance per engine thread,
        # split WATCHER_VLM_MAX_CONCURRENCY so that the total stays within it.
        "vl_rec_max_concurrency": max(
            1, math.ceil(settings.vlm_max_concurrency / settings.engine_concurrency)
        ),
        "device": settings.layout_device,
    }
    if settings.vlm_api_key is not None:
        kwargs["vl_rec_api_key"] = settings.vlm_api_key.get_secret_value()
    return kwargs


def predict_kwargs(settings: Settings) -> dict[str, Any]:
    """Arguments of every `PaddleOCRVL.predict` call. A block whose reading loops stops at
    `max_new_tokens` (WATCHER_VLM_MAX_TOKENS), and PaddleX then cuts the repeated tail off
    itself (`truncate_repetitive_content`, in its paddleocr_vl pipeline): the limits its API
    offers against repetition loops."""
    return {"max_new_tokens": settings.vlm_max_tokens}


def result_json(result: Any) -> dict[str, Any]:
    """A pipeline result's JSON, whether given as `.json` ({"res": {...}}) or a dict."""
    data = getattr(result, "json", result)
    if isinstance(data, str):
        data = json.loads(data)
    if isinstance(data, dict) and isinstance(data.get("res"), dict):
        data = data["res"]
    if not isinstance(data, dict):
        raise TypeError(f"unexpected PaddleOCR-VL result: {type(result).__name__}")
    # Round-trip so that nothing non-JSON (numpy scalars, paths) reaches the result file.
    plain: dict[str, Any] = json.loads(json.dumps(data, default=str, ensure_ascii=False))
    return plain


def result_markdown(result: Any) -> str | None:
    md = getattr(result, "markdown", None)
    if isinstance(md, dict):
        text = md.get("markdown_texts")
        return text if isinstance(text, str) else None
    return md if isinstance(md, str) else None


def _html_text(fragment: str) -> str:
    rows = re.split(r"</tr\s*>", fragment, flags=re.I)
    lines = []
    for row in rows:
        cells = [html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
                 for c in re.split(r"</t[dh]\s*>", row, flags=re.I)]
        line = " ".join(c for c in cells if c)
        if line:
            lines.append(line)
    return "\n".join(lines)


def _polygon(points: Any) -> list[list[float]] | None:
    if not isinstance(points, list) or len(points) < 3:
        return None
    try:
        return [[round(float(p[0]), 1), round(float(p[1]), 1)] for p in points]
    except (TypeError, ValueError, IndexError):
        return None


def _block(entry: dict[str, Any]) -> Block:
    label = str(entry.get("block_label") or "text")
    content = str(entry.get("block_content") or "")
    bbox = [float(v) for v in (entry.get("block_bbox") or [0, 0, 1, 1])[:4]]
    order = entry.get("block_order")
    extra: dict[str, Any] = {}
    for key in ("block_id", "group_id", "global_block_id", "global_group_id"):
        if entry.get(key) is not None:
            extra[key] = entry[key]
    polygon = _polygon(entry.get("block_polygon_points"))
    if polygon is not None:
        extra["polygon"] = polygon
    text = content
    if label in TABLE_LABELS:
        extra["html"] = content
        text = _html_text(content) if "<" in content else content
    elif label in FORMULA_LABELS:
        # Whether the pipeline wraps formulas in $ delimiters depends on its version.
        extra["latex"] = content.strip().strip("$").strip()
    return Block(type=label, bbox=bbox, text=text,
                 order=int(order) if isinstance(order, int) else None, extra=extra)


def blocks_markdown(blocks: list[Block]) -> str:
    """Markdown from blocks, for results that come without the pipeline's own."""
    parts = []
    for block in blocks:
        if block.type in _NO_MARKDOWN or not block.text.strip():
            continue
        if block.type in _TITLE_LEVELS:
            parts.append("#" * _TITLE_LEVELS[block.type] + " " + block.text.strip())
        elif block.type in TABLE_LABELS:
            parts.append(str(block.extra.get("html") or block.text))
        elif block.type in FORMULA_LABELS:
            parts.append(f"$$\n{block.extra.get('latex', block.text).strip()}\n$$")
        else:
            parts.append(block.text.strip())
    return "\n\n".join(parts)


def map_page(page_json: dict[str, Any], index: int, markdown: str | None = None) -> PageResult:
    """One page of PaddleOCR-VL output to a PageResult; every parsing block kept."""
    entries = [e for e in page_json.get("parsing_res_list") or [] if isinstance(e, dict)]
    blocks = [_block(e) for e in entries]
    width = int(page_json.get("width") or 0)
    height = int(page_json.get("height") or 0)
    if width <= 0 or height <= 0:
        # Older results lack the page size; the blocks' extent is the best we know.
        width = max([width, 1, *(math.ceil(b.bbox[2]) for b in blocks)])
        height = max([height, 1, *(math.ceil(b.bbox[3]) for b in blocks)])
    page_index = page_json.get("page_index")
    return PageResult(
        index=page_index if isinstance(page_index, int) else index,
        width=width,
        height=height,
        blocks=blocks,
        markdown=markdown if markdown is not None else blocks_markdown(blocks),
        raw=page_json,
    )


def map_results(results: list[Any]) -> list[PageResult]:
    pages = []
    for i, result in enumerate(results):
        page = map_page(result_json(result), i, result_markdown(result))
        page.index = i  # the document's page order, whatever page_index the input had
        pages.append(page)
    return pages


def _onto(page: RenderedPage | PageResult, result: Any) -> PageResult:
    """A pipeline result mapped onto the page it came from: our index and pixel size."""
    out = map_page(result_json(result), page.index, result_markdown(result))
    out.index, out.width, out.height = page.index, page.width, page.height
    if isinstance(page, PageResult):  # a merge keeps what the page's reading warned of
        out.warnings = list(page.warnings)
    return out


class PaddleVlReader:
    """One `PaddleOCRVL` pipeline, inside a worker process (see watcher/engines/child.py).

    `factory` names the pipeline class as "module:attribute"; the tests point it at a
    labelled fake of the same interface.
    """

    batch_pages = FIXED_BATCH_PAGES

    def __init__(self, pipeline_kwargs: dict[str, Any], factory: str = "paddleocr:PaddleOCRVL",
                 predict_kwargs: dict[str, Any] | None = None) -> None:
        self.predict_kwargs = predict_kwargs or {}
        module, _, attr = factory.partition(":")
        self.device = str(pipeline_kwargs.get("device") or "")
        pipeline_class = getattr(importlib.import_module(module), attr)  # heavy: paddle
        # PaddleX creates the layout model's predictor, and checks its device, here.
        with layout_device_errors(self.device):
            self.pipeline = pipeline_class(**pipeline_kwargs)

    def warm(self) -> None:
        check_warm_page(self.recognise_pages([synthetic_page()])[0])

    def recognise_pages(self, pages: list[RenderedPage]) -> list[PageResult]:
        import numpy as np

        # PaddleX treats arrays as BGR, the order its own image reader produces.
        images = [np.ascontiguousarray(np.asarray(page.image.convert("RGB"))[:, :, ::-1])
                  for page in pages]
        with layout_device_errors(self.device):  # in case a model is built lazily
            results = list(self.pipeline.predict(images, **self.predict_kwargs))
        if len(results) != len(pages):
            raise RuntimeError(f"PaddleOCR-VL returned {len(results)} results for {len(pages)} pages")
        return [_onto(page, result) for page, result in zip(pages, results, strict=True)]

    def finish_document(self, pages: list[PageResult]) -> list[PageResult]:
        restructure = getattr(self.pipeline, "restructure_pages", None)
        # Pages the VLM read; those from a text layer or in error have nothing to merge.
        read = [i for i, p in enumerate(pages) if p.raw is not None]
        if restructure is None or len(read) < 2:
            return pages
        # Plain {"res": ...} dicts: PaddleX rebuilds its blocks from the JSON it emitted.
        merged = list(restructure([{"res": pages[i].raw} for i in read], merge_tables=True,
                                  relevel_titles=True, concatenate_pages=False))
        if len(merged) != len(read):
            # A single concatenated result would lose the pages; keep them unmerged.
            log.warning("paddleocr_vl_restructure_shape", pages=len(read), restructured=len(merged))
            return pages
        out = list(pages)
        for i, result in zip(read, merged, strict=True):
            out[i] = _onto(pages[i], result)
        return out


class PageBatches:
    """Pages per call, so that the blocks the pipeline sends fill the request limit.

    `limit` is the engine's AdaptiveLimit; `in_flight` (its load) estimates the requests
    the busy workers have at the server from the pages of their calls.
    """

    def __init__(self, workers: int, per_worker: int, upper: int, timeout: float) -> None:
        self.workers = workers
        self.per_worker = per_worker  # vl_rec_max_concurrency of each pipeline
        self.blocks_per_page = INITIAL_BLOCKS_PER_PAGE
        self.pages_in_calls: Callable[[], list[int]] = list
        initial = math.ceil(workers * FIXED_BATCH_PAGES * INITIAL_BLOCKS_PER_PAGE)
        # Each worker is between calls now and then (layout, the pipe, the next batch):
        # a queue at the server of one worker's share keeps it full meanwhile.
        self.limit = AdaptiveLimit(upper=upper, initial=initial, timeout=timeout,
                                   in_use=self.in_flight, queue_share=1.0)

    def observe(self, page: PageResult) -> None:
        sent = sum(1 for block in page.blocks if block.type not in NOT_SENT_TO_VLM)
        self.blocks_per_page += BLOCKS_WEIGHT * (max(1, sent) - self.blocks_per_page)

    def size(self) -> int:
        if self.limit.mode != "metrics":
            return FIXED_BATCH_PAGES
        share = self.limit.limit / self.workers
        return min(MAX_BATCH_PAGES, max(1, math.ceil(share / self.blocks_per_page)))

    def in_flight(self) -> int:
        return sum(min(self.per_worker, math.ceil(pages * self.blocks_per_page))
                   for pages in self.pages_in_calls())


class PaddleOcrVlEngine(SupervisedEngine):
    structured = True
    uses_vlm_server = True

    def __init__(
        self,
        settings: Settings,
        pipeline_factory: str = "paddleocr:PaddleOCRVL",
        probe_interval: float = 2.0,
    ) -> None:
        kwargs = pipeline_kwargs(settings)
        super().__init__(
            ReaderSpec("watcher.engines.paddleocr_vl:PaddleVlReader",
                       {"pipeline_kwargs": kwargs, "factory": pipeline_factory,
                        "predict_kwargs": predict_kwargs(settings)},
                       env=worker_env(settings)),
            name="paddleocr-vl",
            model=f"PaddleOCR-VL {settings.pipeline_version} ({settings.vlm_model} via vLLM)",
            workers=settings.engine_concurrency,
            timeout=settings.engine_timeout,
            # The first pipeline build loads the layout model onto the GPU.
            warm_timeout=max(settings.engine_timeout, settings.vlm_startup_timeout),
            max_rss_mb=settings.engine_max_rss_mb,
            batch_pages=PaddleVlReader.batch_pages,
        )
        self.settings = settings
        self.url = settings.vlm_url
        self.probe_interval = probe_interval
        self._session: aiohttp.ClientSession | None = None
        self._probe: asyncio.Task[None] | None = None
        self.api_key = settings.vlm_api_key.get_secret_value() if settings.vlm_api_key else None
        self.batches = PageBatches(
            workers=settings.engine_concurrency,
            per_worker=kwargs["vl_rec_max_concurrency"],
            upper=settings.vlm_max_concurrency, timeout=settings.vlm_timeout)
        self.batches.pages_in_calls = self.pages_in_calls
        self._gauges: asyncio.Task[None] | None = None

    def batch_limit(self) -> int:
        return self.batches.size()

    def request_limit(self) -> int:
        return self.batches.limit.limit

    def snapshot(self) -> dict[str, Any]:
        limit = self.batches.limit
        return {**super().snapshot(), "vlm_requests": {
            "limit": limit.limit,
            "upper_bound": limit.upper,
            "inflight": self.batches.in_flight(),
            "mode": limit.mode,
            **limit.server_view(),
            "pages_per_call": self.batches.size(),
            "blocks_per_page": round(self.batches.blocks_per_page, 1),
        }}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def warm(self) -> None:
        session = self._http()
        if self._probe is None:
            self._probe = asyncio.create_task(
                vlm_server.probe_forever(self, session, self.url, self.probe_interval),
                name="vlm-probe",
            )
        if self._gauges is None:
            self._gauges = asyncio.create_task(
                poll_server_gauges(self.batches.limit, session, self.url, api_key=self.api_key),
                name="vlm-gauges",
            )
        # The workers' warm-up needs the VLM: wait for the server before starting them.
        await vlm_server.wait_for_health(session, self.url, self.settings.vlm_startup_timeout,
                                         self.name)
        await vlm_server.check_model(session, self.url, self.settings.vlm_model, self.api_key)
        await super().warm()

    async def recognise(self, page: RenderedPage) -> PageResult:
        try:
            result = await super().recognise(page)
        except EngineCrashed as exc:
            await self._unless_server_down(exc)
            raise
        self.mark_available()
        self.batches.observe(result)
        return result

    async def finish_document(self, pages: list[PageResult]) -> list[PageResult]:
        try:
            return await super().finish_document(pages)
        except EngineCrashed as exc:
            await self._unless_server_down(exc)
            raise

    def _needs_finish(self, pages: list[PageResult]) -> bool:
        return len(pages) > 1

    async def _unless_server_down(self, exc: EngineCrashed) -> None:
        """A page that failed because vLLM is down waits; it is not charged an attempt."""
        if exc.connection_error or not await vlm_server.is_healthy(self._http(), self.url):
            reason = f"VLM server {self.url} unreachable: {exc}"
            self.mark_unavailable(reason)
            raise EngineUnavailable(reason) from exc

    async def close(self) -> None:
        if self._gauges is not None:
            self._gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauges
            self._gauges = None
        await vlm_server.close_probe_and_session(self._probe, self._session)
        self._probe, self._session = None, None
        await super().close()

"""The paddleocr-vl engine: PaddleOCR 3.x's `PaddleOCRVL` pipeline, VLM on a vLLM server.

The layout model runs in-process (WATCHER_LAYOUT_DEVICE); each layout block is then
recognised by the VLM that vLLM serves at WATCHER_VLM_URL. The engine is document-level:
the pipeline reads the whole file itself, and for multi-page documents
`restructure_pages` merges tables that continue across pages and re-levels titles.

Paddle is heavy and absent from the base install, so `paddleocr` is imported only inside
the worker threads. Each worker thread owns one pipeline (they are not thread-safe); the
pool has WATCHER_ENGINE_CONCURRENCY threads.

Mapping: every entry of the page's `parsing_res_list` becomes one block (type =
`block_label`, bbox = `block_bbox`, text = `block_content`, order = `block_order`);
tables keep their HTML (`html`), formulas their LaTeX (`latex`); the page's own JSON is
kept whole as `PageResult.raw`, which the result file carries as `pages[].raw`.
"""

from __future__ import annotations

import asyncio
import html
import json
import math
import re
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp

from watcher.decode import RenderedPage
from watcher.engines import vlm_server
from watcher.engines.base import WARMUP_TEXT, Block, Engine, PageResult, synthetic_page
from watcher.errors import EngineUnavailable
from watcher.logs import get_logger
from watcher.settings import Settings

log = get_logger("watcher.engine")

TABLE_LABELS = {"table"}
FORMULA_LABELS = {"formula", "display_formula", "inline_formula"}
_TITLE_LEVELS = {"doc_title": 1, "paragraph_title": 2}
# Images carry no text; their crops are referenced by the pipeline's own Markdown only.
_NO_MARKDOWN = {"image", "chart", "seal", "header_image", "footer_image", "number"}


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


def _looks_like_connection_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        if isinstance(current, ConnectionError | TimeoutError) or "Connection" in name or "Timeout" in name:
            return True
        current = current.__cause__ or current.__context__
    return False


def _default_factory(settings: Settings) -> Callable[[], Any]:
    kwargs = pipeline_kwargs(settings)

    def build() -> Any:
        from paddleocr import PaddleOCRVL  # heavy: paddle, the layout model

        return PaddleOCRVL(**kwargs)

    return build


class PaddleOcrVlEngine(Engine):
    name = "paddleocr-vl"
    document_level = True

    def __init__(
        self,
        settings: Settings,
        pipeline_factory: Callable[[], Any] | None = None,
        probe_interval: float = 2.0,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.url = settings.vlm_url
        self.model = f"PaddleOCR-VL {settings.pipeline_version} ({settings.vlm_model} via vLLM)"
        self.concurrency = settings.engine_concurrency
        self.probe_interval = probe_interval
        self._factory = pipeline_factory or _default_factory(settings)
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="paddle")
        self._local = threading.local()
        self._session: aiohttp.ClientSession | None = None
        self._probe: asyncio.Task[None] | None = None
        self.api_key = settings.vlm_api_key.get_secret_value() if settings.vlm_api_key else None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def _pipeline(self) -> Any:
        pipeline = getattr(self._local, "pipeline", None)
        if pipeline is None:
            pipeline = self._factory()
            self._local.pipeline = pipeline
        return pipeline

    def _predict_sync(self, path: str) -> list[PageResult]:
        pipeline = self._pipeline()
        results = list(pipeline.predict(path))
        restructure = getattr(pipeline, "restructure_pages", None)
        if len(results) > 1 and restructure is not None:
            merged = list(restructure(results, merge_tables=True, relevel_titles=True,
                                      concatenate_pages=False))
            if len(merged) == len(results):
                results = merged
            else:
                # A single concatenated result would lose the pages; keep them unmerged.
                log.warning("paddleocr_vl_restructure_shape", pages=len(results),
                            restructured=len(merged))
        return map_results(results)

    async def recognize_document(
        self, path: Path, doc_format: str, page_count: int
    ) -> list[PageResult]:
        loop = asyncio.get_running_loop()
        try:
            pages = await loop.run_in_executor(self._executor, self._predict_sync, str(path))
        except Exception as exc:
            # Paddle's VLM client has its own exception types; rather than import them,
            # ask the server: if it is not healthy, the document waits instead of failing.
            if _looks_like_connection_error(exc) or not await vlm_server.is_healthy(
                self._http(), self.url
            ):
                reason = f"VLM server {self.url} unreachable: {type(exc).__name__}: {exc}"
                self.mark_unavailable(reason)
                raise EngineUnavailable(reason) from exc
            raise
        self.mark_available()
        if len(pages) != page_count:
            log.warning("paddleocr_vl_page_count", expected=page_count, got=len(pages))
        return pages

    async def recognize(self, page: RenderedPage) -> PageResult:
        """Single images (the warm-up page): saved to a temp PNG and run as a document."""
        with tempfile.TemporaryDirectory(prefix="watcher-vl-") as tmp:
            target = Path(tmp) / "page.png"
            await asyncio.to_thread(page.image.save, target, "PNG")
            pages = await self.recognize_document(target, "png", 1)
        return pages[0]

    async def warm(self) -> None:
        session = self._http()
        if self._probe is None:
            self._probe = asyncio.create_task(
                vlm_server.probe_forever(self, session, self.url, self.probe_interval),
                name="vlm-probe",
            )
        await vlm_server.wait_for_health(session, self.url, self.settings.vlm_startup_timeout,
                                         self.name)
        await vlm_server.check_model(session, self.url, self.settings.vlm_model, self.api_key)
        page = synthetic_page()
        # One pass per worker thread, so that each builds its pipeline before any document.
        results = await asyncio.gather(*(self.recognize(page) for _ in range(self.concurrency)))
        text = results[0].markdown + " " + " ".join(b.text for b in results[0].blocks)
        if "WARMUP" not in text.upper():
            raise RuntimeError(f"warm-up page read as {text.strip()!r}, expected {WARMUP_TEXT!r}")

    async def close(self) -> None:
        await vlm_server.close_probe_and_session(self._probe, self._session)
        self._probe, self._session = None, None
        self._executor.shutdown(wait=False, cancel_futures=True)

"""The CPU engine: RapidOCR with the PP-OCR ONNX models bundled in its wheel.

Nothing is downloaded at run time. Each worker thread owns its own RapidOCR instance
(onnxruntime sessions are heavy but instances are not shared across threads), and the
event loop only awaits the thread pool.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from watcher.decode import RenderedPage
from watcher.engines.base import WARMUP_TEXT, Block, Engine, PageResult, synthetic_page


def _rapidocr_version() -> str:
    try:
        return version("rapidocr-onnxruntime")
    except PackageNotFoundError:  # pragma: no cover - the dependency is mandatory
        return "unknown"


class CpuEngine(Engine):
    name = "cpu"

    def __init__(self, concurrency: int = 1) -> None:
        super().__init__()
        self.model = f"rapidocr-onnxruntime {_rapidocr_version()} (PP-OCRv4 det/rec, ONNX)"
        self.concurrency = concurrency
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="ocr")
        self._local = threading.local()

    def _ocr(self) -> Any:
        ocr = getattr(self._local, "ocr", None)
        if ocr is None:
            from rapidocr_onnxruntime import RapidOCR  # heavy: loads onnxruntime

            ocr = RapidOCR()
            self._local.ocr = ocr
        return ocr

    def _recognize_sync(self, page: RenderedPage) -> PageResult:
        result, _elapsed = self._ocr()(page.image)
        blocks = [_block(item) for item in result or []]
        blocks = reading_order(blocks)
        for order, block in enumerate(blocks):
            block.order = order
        return PageResult(
            index=page.index,
            width=page.width,
            height=page.height,
            blocks=blocks,
            markdown=lines_to_markdown(blocks),
        )

    async def recognize(self, page: RenderedPage) -> PageResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._recognize_sync, page)

    async def warm(self) -> None:
        page = synthetic_page()
        # One warm call per worker thread, so that no document pays for a model load.
        results = await asyncio.gather(*(self.recognize(page) for _ in range(self.concurrency)))
        text = " ".join(b.text for b in results[0].blocks)
        if "WARMUP" not in text.upper():
            raise RuntimeError(f"warm-up page read as {text!r}, expected {WARMUP_TEXT!r}")

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _block(item: Any) -> Block:
    polygon, text, score = item[0], item[1], item[2]
    xs = [float(p[0]) for p in polygon]
    ys = [float(p[1]) for p in polygon]
    return Block(
        type="text",
        bbox=[round(min(xs), 1), round(min(ys), 1), round(max(xs), 1), round(max(ys), 1)],
        text=str(text),
        score=round(float(score), 4),
        extra={"polygon": [[round(float(x), 1), round(float(y), 1)] for x, y in polygon]},
    )


def _same_line(a: Block, b: Block) -> bool:
    """Two boxes share a line when their vertical extents overlap by half the smaller."""
    overlap = min(a.bbox[3], b.bbox[3]) - max(a.bbox[1], b.bbox[1])
    smaller = min(a.bbox[3] - a.bbox[1], b.bbox[3] - b.bbox[1])
    return smaller > 0 and overlap >= smaller / 2


def group_lines(blocks: list[Block]) -> list[list[Block]]:
    lines: list[list[Block]] = []
    for block in sorted(blocks, key=lambda b: (b.bbox[1], b.bbox[0])):
        if lines and _same_line(lines[-1][-1], block):
            lines[-1].append(block)
        else:
            lines.append([block])
    return [sorted(line, key=lambda b: b.bbox[0]) for line in lines]


def reading_order(blocks: list[Block]) -> list[Block]:
    """Top-to-bottom lines, left-to-right within a line."""
    return [block for line in group_lines(blocks) for block in line]


def lines_to_markdown(blocks: list[Block]) -> str:
    """Lines in reading order; a vertical gap wider than a line starts a new paragraph."""
    paragraphs: list[list[str]] = []
    previous_bottom: float | None = None
    for line in group_lines(blocks):
        top = min(b.bbox[1] for b in line)
        bottom = max(b.bbox[3] for b in line)
        height = bottom - top
        text = " ".join(b.text.strip() for b in line if b.text.strip())
        if not text:
            continue
        if previous_bottom is None or top - previous_bottom > 0.8 * height:
            paragraphs.append([])
        paragraphs[-1].append(text)
        previous_bottom = bottom
    return "\n\n".join("\n".join(p) for p in paragraphs)

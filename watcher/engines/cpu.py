"""The CPU engine: RapidOCR with the PP-OCR ONNX models bundled in its wheel.

Nothing is downloaded at run time. `CpuReader` is the synchronous core; the daemon runs
it in supervised worker processes (`create_engine`, watcher/engines/supervisor.py).
`CpuEngine` runs the same reader on threads of the calling process, for the test suite
and tools that share one warm model across many short-lived daemons.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from watcher.decode import RenderedPage
from watcher.engines.base import Block, Engine, PageResult, check_warm_page, synthetic_page


def model_description() -> str:
    try:
        release = version("rapidocr-onnxruntime")
    except PackageNotFoundError:  # pragma: no cover - the dependency is mandatory
        release = "unknown"
    return f"rapidocr-onnxruntime {release} (PP-OCRv4 det/rec, ONNX)"


class CpuReader:
    """One RapidOCR instance; not thread-safe, so one per thread or process."""

    batch_pages = 1  # RapidOCR reads one image per call; batching would only add latency

    def __init__(self) -> None:
        from rapidocr_onnxruntime import RapidOCR  # heavy: loads onnxruntime

        self._ocr = RapidOCR()

    def warm(self) -> None:
        check_warm_page(self.recognize(synthetic_page()))

    def recognize(self, page: RenderedPage) -> PageResult:
        result, _elapsed = self._ocr(page.image)
        blocks = reading_order([_block(item) for item in result or []])
        for order, block in enumerate(blocks):
            block.order = order
        return PageResult(
            index=page.index,
            width=page.width,
            height=page.height,
            blocks=blocks,
            markdown=lines_to_markdown(blocks),
        )

    def recognize_pages(self, pages: list[RenderedPage]) -> list[PageResult]:
        return [self.recognize(page) for page in pages]

    def finish_document(self, pages: list[PageResult]) -> list[PageResult]:
        return pages


class CpuEngine(Engine):
    """CpuReader on this process's threads: for tests and tools, not for the daemon."""

    name = "cpu"

    def __init__(self, concurrency: int = 1) -> None:
        super().__init__()
        self.model = model_description()
        self.concurrency = concurrency
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="ocr")
        self._local = threading.local()

    def _reader(self) -> CpuReader:
        reader: CpuReader | None = getattr(self._local, "reader", None)
        if reader is None:
            reader = CpuReader()
            self._local.reader = reader
        return reader

    def _recognize_sync(self, page: RenderedPage) -> PageResult:
        return self._reader().recognize(page)

    async def recognize(self, page: RenderedPage) -> PageResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._recognize_sync, page)

    async def warm(self) -> None:
        page = synthetic_page()
        # One warm call per worker thread, so that no document pays for a model load.
        results = await asyncio.gather(*(self.recognize(page) for _ in range(self.concurrency)))
        check_warm_page(results[0])

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

"""The engine interface: warm once, then recognise rendered pages."""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Protocol

from PIL import Image, ImageDraw, ImageFont

from watcher.core.logs import get_logger
from watcher.core.pages import PageResult, RenderedPage

log = get_logger("watcher.engine")


class EngineState(StrEnum):
    NOT_INITIALIZED = "not_initialized"
    WARMING = "warming"
    READY = "ready"
    FAILED = "failed"


WARMUP_TEXT = "WATCHER WARMUP 2026"


def synthetic_page() -> RenderedPage:
    """A small page with known text, run through the engine before any document."""
    image = Image.new("RGB", (640, 200), "white")
    draw = ImageDraw.Draw(image)
    draw.text((40, 70), WARMUP_TEXT, fill="black", font=ImageFont.load_default(size=40))
    return RenderedPage(0, image, image.width, image.height)


def check_warm_page(result: PageResult) -> None:
    """Warm-up passes only when the synthetic page's words came back."""
    text = result.markdown + " " + " ".join(b.text for b in result.blocks)
    if "WARMUP" not in text.upper():
        raise RuntimeError(f"warm-up page read as {text.strip()!r}, expected {WARMUP_TEXT!r}")


class PageReader(Protocol):
    """The synchronous core of a heavy engine, run inside a supervised worker process.

    `recognise_pages` gets at most `batch_pages` pages at once; `finish_document` sees a
    whole document's pages at the end (PaddleOCR-VL merges tables across pages there).
    """

    batch_pages: int

    def warm(self) -> None: ...

    def recognise_pages(self, pages: list[RenderedPage]) -> list[PageResult]: ...

    def finish_document(self, pages: list[PageResult]) -> list[PageResult]: ...


class Engine(abc.ABC):
    name: str = "engine"
    model: str = ""
    # Reads layout, tables and formulas, which a PDF's text layer does not hold: its pages
    # go to the engine even where the text layer could be trusted (watcher/pipeline/recognise.py).
    structured: bool = False
    # Reads through a VLM server (vLLM) that may be down while the daemon lives on.
    uses_vlm_server: bool = False

    def __init__(self) -> None:
        self.state = EngineState.NOT_INITIALIZED
        self.error: str | None = None
        self.warm_seconds: float | None = None
        # Set while a warm engine cannot reach its backend (VLM server down): /ready turns
        # 503 and workers hold documents back instead of failing them.
        self.unavailable: str | None = None
        # The daemon counts worker restarts in its metrics; the engine only reports them.
        self.on_restart: Callable[[str], None] = lambda reason: None

    def mark_unavailable(self, reason: str) -> None:
        if self.unavailable is None:
            log.warning("engine_unavailable", engine=self.name, reason=reason)
        self.unavailable = reason

    def mark_available(self) -> None:
        if self.unavailable is not None:
            log.info("engine_available_again", engine=self.name)
        self.unavailable = None

    async def start(self) -> None:
        """Load and warm; never raises: failure is reported through `state`/`error`."""
        self.state = EngineState.WARMING
        started = time.perf_counter()
        log.info("engine_warming", engine=self.name, model=self.model)
        try:
            await self.warm()
        except Exception as exc:
            self.state = EngineState.FAILED
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("engine_failed", engine=self.name, error=self.error, exc_info=True)
            return
        self.warm_seconds = round(time.perf_counter() - started, 3)
        self.state = EngineState.READY
        self.error = None
        log.info("engine_ready", engine=self.name, model=self.model, seconds=self.warm_seconds)

    @abc.abstractmethod
    async def warm(self) -> None:
        """Load models and run `synthetic_page()` through the whole path."""

    @abc.abstractmethod
    async def recognise(self, page: RenderedPage) -> PageResult:
        """Recognise one rendered page; must not block the event loop."""

    async def finish_document(self, pages: list[PageResult]) -> list[PageResult]:
        """After a document's last page: cross-page work (PaddleOCR-VL's table merge)."""
        return pages

    def pages_wanted(self) -> int | None:
        """How many pages the engine wants in flight now; None: the settings decide."""
        return None

    def request_limit(self) -> int | None:
        """The adaptive bound on requests to a VLM server, for engines that have one."""
        return None

    def snapshot(self) -> dict[str, Any]:
        """Extra state for /health (worker processes, request limits)."""
        return {}

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release threads, sessions and connections."""

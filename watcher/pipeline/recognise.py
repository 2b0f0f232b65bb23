"""Recognise: one page's text, from the PDF's own text layer or from the engine.

`WATCHER_TEXT_LAYER` chooses:

- `auto` (default): a PDF page whose text layer can be trusted (watcher/pipeline/textlayer.py) is
  taken from it, exactly and without rendering, when the engine reads plain text (`cpu`).
  A layer whose words do not read as the configured languages (watcher/pipeline/words.py)
  is doubtful: an earlier OCR's invisible text over a scan that has fewer than 70 % real
  words, or any layer with fewer than 30 % or with Latin and Cyrillic letters mixed in
  its words (a font mapped to the wrong letters). The engine then reads the page too, and
  the reading with more real words wins; when it is the engine's, a
  `text_layer_replaced` warning says why.
  The VLM engines read every page, because their layout, tables and formulas are what they
  are for; where the page's text layer is trusted, their text blocks then take the exact
  text of the layer lines inside their boxes (tables, formulas and figures keep the VLM's
  reading; each block says which in `text_source`). A page where they find nothing
  although its text layer holds text (a font that is not embedded renders blank) takes
  the text layer instead.
- `ocr`: every page goes to the engine.
- `text`: PDF pages are never sent to the engine; their text layer is all there is.
  Images have no text layer and are always read by the engine.

A page that cannot be rendered or read gets `error` and the document's other pages keep
their text; each page says where its text came from (`text_source`) and what went wrong
short of an error (`warnings`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from watcher.core import progress
from watcher.core.errors import DocumentError, EngineCrashed, EngineUnavailable, ErrorCode
from watcher.core.logs import get_logger
from watcher.core.metrics import Metrics, StageTimer
from watcher.core.pages import PageResult
from watcher.core.refs import ObjectRef
from watcher.core.settings import MiB, Settings, TextLayerMode
from watcher.engines.base import Engine
from watcher.pipeline import words
from watcher.pipeline.assets import crop_figures
from watcher.pipeline.budget import PageBudget, Ticket
from watcher.pipeline.checkpoint import Checkpoints
from watcher.pipeline.decode import Decoder, Document, Limits
from watcher.pipeline.textlayer import TextLayer, take_exact_text

T = TypeVar("T")
log = get_logger("watcher.pipeline.recognise")

_REASONS = {
    "no_text_layer": "it has no text layer",
    "little_text": "its text layer holds almost nothing",
    "garbled": "its text layer is garbled (characters its fonts do not map to Unicode)",
    "mojibake": "its text layer is mis-encoded (Cyrillic read as Latin-1 letters)",
    "mostly_image": "the page is mostly a picture that its text layer does not cover",
    "mostly_drawing": "the page draws far more than its text layer holds (text as outlines?)",
}


async def engine_call(call: Awaitable[T]) -> T:
    """Whatever an engine raises beyond the known kinds is a failure on this page."""
    try:
        return await call
    except (DocumentError, EngineUnavailable, EngineCrashed):
        raise
    except Exception as exc:
        raise EngineCrashed("error", f"{type(exc).__name__}: {exc}") from exc


# When a text layer's words make it doubtful (see the module docstring).
MIN_KNOWN_OCR_LAYER = 0.7
MIN_KNOWN_LAYER = 0.3
MAX_MIXED_WORDS = 0.1
MIN_WORDS_TO_JUDGE = 8


def is_doubtful(layer: TextLayer, found: words.WordScore) -> bool:
    """Whether a trusted layer's words make it doubtful (see the module docstring)."""
    if found.words < MIN_WORDS_TO_JUDGE:
        return False
    least = MIN_KNOWN_OCR_LAYER if layer.left_by_an_ocr else MIN_KNOWN_LAYER
    return found.known < least or found.mixed > MAX_MIXED_WORDS


def engine_reads_better(layer_score: words.WordScore, engine_score: words.WordScore) -> bool:
    """The engine's reading replaces a doubtful layer only with more real words: on a tie
    the layer, exact where it is right, stays."""
    return engine_score.known > layer_score.known


class Recogniser:
    def __init__(self, decoder: Decoder, engine: Engine, mode: TextLayerMode,
                 ocr_languages: str = "rus+eng") -> None:
        self.decoder = decoder
        self.engine = engine
        self.mode = mode
        self.languages = words.languages(ocr_languages)
        self.language_names = ocr_languages

    async def page(self, doc: Document, index: int, timer: StageTimer) -> PageResult:
        """Page `index` read; a fault of the page itself is kept on the page."""
        try:
            result = await self._read(doc, index, timer)
        except DocumentError as exc:
            return PageResult(index=index, width=0, height=0, blocks=[], markdown="",
                              error={"code": exc.code.value, "message": exc.message})
        if not result.text.strip():
            result.warnings.append({"code": "no_text", "message": _no_text(index, result)})
        return result

    async def _read(self, doc: Document, index: int, timer: StageTimer) -> PageResult:
        layer: TextLayer | None = None
        text_first = self.mode is TextLayerMode.TEXT or (
            self.mode is TextLayerMode.AUTO and not self.engine.structured)
        doubt: words.WordScore | None = None
        if text_first:
            layer = await self._text_layer(doc, index, timer)
            if layer is not None and self.mode is TextLayerMode.TEXT:
                return _from_layer(layer, "it is used as it is because WATCHER_TEXT_LAYER=text")
            if layer is not None and layer.trusted:
                doubt = await self._doubt(layer)
                if doubt is None:
                    return layer.result
        with timer.stage("decode"):
            rendered = await self.decoder.render(doc, index)
        call = engine_call(self.engine.recognise(rendered))
        warnings, dpi = rendered.warnings, rendered.dpi
        del rendered  # the engine decides how long the bitmap lives
        with timer.stage("engine"):
            result = await call
        result.warnings[:0] = warnings
        result.dpi = dpi
        if doubt is not None and layer is not None:
            return await self._better(layer, doubt, result)
        if result.text.strip() and self.engine.structured and self.mode is TextLayerMode.AUTO:
            await self._exact_text(doc, index, timer, result)
        if result.text.strip() or self.mode is TextLayerMode.OCR:
            return result
        # The engine saw nothing: a structured engine's page reads its text layer only now.
        if layer is None:
            layer = await self._text_layer(doc, index, timer)
        if layer is None or not layer.chars or not _usable(layer):
            return result
        fallback = _from_layer(layer, "it is used because the engine found no text on the rendered page")
        fallback.warnings[:0] = [*warnings, {
            "code": "engine_read_nothing",
            "message": f"page {index + 1}: the engine found no text on the rendered page; "
            "the text is taken from the PDF's text layer (fonts that are not embedded "
            "can render blank)",
        }]
        return fallback

    async def _exact_text(self, doc: Document, index: int, timer: StageTimer, read: PageResult) -> None:
        """A VLM's text blocks take the exact text of a trusted layer (tables, formulas and
        figures keep the VLM's reading): VLMs misread letters that a born-digital PDF has."""
        layer = await self._text_layer(doc, index, timer)
        if layer is None or not layer.trusted or await self._doubt(layer) is not None:
            return
        taken = take_exact_text(read, layer.result)
        if taken:
            log.info("text_from_layer", page=index, blocks=taken)

    async def _doubt(self, layer: TextLayer) -> words.WordScore | None:
        """The layer's word score when its words make it doubtful, else None."""
        if not self.languages:
            return None
        found = await asyncio.to_thread(words.score, layer.result.text, self.languages)
        return found if is_doubtful(layer, found) else None

    async def _better(self, layer: TextLayer, doubt: words.WordScore, read: PageResult) -> PageResult:
        """The doubtful layer or the engine's reading of the page, whichever has more real
        words; the layer, exact where it is right, on a tie."""
        engine_score = await asyncio.to_thread(words.score, read.text, self.languages)
        index = layer.result.index
        if not engine_reads_better(doubt, engine_score):
            log.info("text_layer_kept", page=index, layer_words=round(doubt.known, 3),
                     engine_words=round(engine_score.known, 3))
            return layer.result
        kind = ("left by an earlier OCR (invisible text over the scan)" if layer.left_by_an_ocr
                else "of the PDF")
        mixed = (f", and {round(100 * doubt.mixed)} % of them mix Latin and Cyrillic letters"
                 if doubt.mixed > MAX_MIXED_WORDS else "")
        read.warnings.append({
            "code": "text_layer_replaced",
            "message": f"page {index + 1}: the text layer {kind} has only {doubt.percent()} "
            f"real words in {self.language_names}{mixed}; the engine's reading of the page, "
            f"with {engine_score.percent()}, is used instead",
        })
        return read

    async def _text_layer(self, doc: Document, index: int, timer: StageTimer) -> TextLayer | None:
        with timer.stage("decode"):
            return await self.decoder.text_layer(doc, index)


def _warn_of_document(doc: Document, pages: list[PageResult]) -> None:
    """What the document as a whole warns of goes on its first page's warnings, once
    (a page kept from an earlier attempt may carry it already)."""
    first = pages[0]
    first.warnings[:0] = [w for w in doc.warnings if w not in first.warnings]


def _usable(layer: TextLayer) -> bool:
    """Good enough to stand in for an engine that saw nothing: not garbage."""
    return layer.reason not in ("garbled", "mojibake")


def _from_layer(layer: TextLayer, why: str) -> PageResult:
    """The page as its text layer holds it; one that is not trusted says so, and `why` it
    is used all the same."""
    result = layer.result
    if not layer.trusted and layer.chars:
        result.warnings.append({
            "code": "text_layer_untrusted",
            "message": f"page {result.index + 1}: {_REASONS.get(layer.reason, layer.reason)}; {why}",
        })
    return result


def _no_text(index: int, result: PageResult) -> str:
    if result.text_source == "text_layer":
        return (f"page {index + 1}: its text layer holds no text, and WATCHER_TEXT_LAYER=text "
                "keeps it from being read from its pixels")
    return (f"page {index + 1}: no text found; the page is blank, or holds text the engine "
            "cannot read (handwriting, a script outside WATCHER_OCR_LANGUAGES)")


# The code of a page not read again because the engine (or the whole pod) died on it on
# earlier attempts; a document none of whose pages could be read is `engine_failed`.
ENGINE_CRASHED = "engine_crashed"


def blamed_page(index: int, attempts: int) -> PageResult:
    """A page that took the engine's worker or the pod down on earlier attempts, left out
    on the document's last attempt so that its other pages get their text."""
    message = (f"page {index + 1}: the engine's worker or the whole pod died while reading "
               f"this page ({attempts} failed attempts on the document); it was not read again")
    problem = {"code": ENGINE_CRASHED, "message": message}
    return PageResult(index=index, width=0, height=0, blocks=[], markdown="", error=problem,
                      warnings=[dict(problem)])


def unreadable(pages: list[PageResult]) -> DocumentError | None:
    """The document's error when none of its pages could be read, else None."""
    if not pages or any(page.error is None for page in pages):
        return None
    errors = [page.error for page in pages if page.error is not None]
    first = errors[0]
    listed = "; ".join(e["message"] for e in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    # Page errors come from DocumentError codes, or are pages the engine died on.
    code = ErrorCode.ENGINE_FAILED if first["code"] == ENGINE_CRASHED else ErrorCode(first["code"])
    prefix = "" if len(pages) == 1 else f"none of its {len(pages)} pages could be read: "
    return DocumentError(code, f"{prefix}{listed}{more}")


@dataclass(frozen=True)
class Reading:
    format: str
    pages: list[PageResult]
    assets: dict[str, bytes] = field(default_factory=dict)  # figure PNGs by name (assets.py)


@dataclass(frozen=True)
class ReadPlan:
    """How a document is read. A suspect (crashes on record; pipeline/isolation.py) is read
    page by page, every page checkpointed, and says before each page which one it is on
    (`progress`, which writes it into the lease); on its last attempt the pages blamed
    for earlier crashes are left out (`skip`)."""

    alone: bool = False
    skip: frozenset[int] = frozenset()
    attempts: int = 0
    progress: Callable[[int | None], Awaitable[None]] | None = field(default=None, compare=False)

    async def on_page(self, index: int | None) -> None:
        if self.progress is not None:
            await self.progress(index)


EVERYTHING_AT_ONCE = ReadPlan()


class Reader(Protocol):
    """What the pipeline asks of the decode and recognise stages for one document."""

    def engine_id(self) -> dict[str, str]:
        """How a result names what read it (engine name and model)."""
        ...

    async def read(self, ref: ObjectRef, path: Path, size: int, timer: StageTimer,
                   ticket: Ticket, plan: ReadPlan = EVERYTHING_AT_ONCE) -> Reading: ...


class DocumentReader:
    """A document's pages: decoded on demand, each read from its text layer or by the
    engine, at most WATCHER_PAGE_CONCURRENCY in memory and within the page budget; pages
    kept from an earlier attempt (checkpoint.py) are not read again."""

    def __init__(self, decoder: Decoder, engine: Engine, settings: Settings,
                 checkpoints: Checkpoints, budget: PageBudget, metrics: Metrics) -> None:
        self.decoder = decoder
        self.engine = engine
        self.checkpoints = checkpoints
        self.budget = budget
        self.metrics = metrics
        self.page_concurrency = settings.page_concurrency
        self.limits = Limits(settings.max_pages, settings.max_page_pixels, settings.render_dpi)
        self.recogniser = Recogniser(decoder, engine, settings.text_layer, settings.ocr_languages)
        self.assets_max = settings.assets_max_mb * MiB if settings.assets else None

    def engine_id(self) -> dict[str, str]:
        return {"name": self.engine.name, "model": self.engine.model}

    async def read(self, ref: ObjectRef, path: Path, size: int, timer: StageTimer,
                   ticket: Ticket, plan: ReadPlan = EVERYTHING_AT_ONCE) -> Reading:
        with timer.stage("recognise"):
            with timer.stage("decode"):
                doc = await self.decoder.open(path, size, self.limits, ref.key)
            log.info("document_decoded", format=doc.format.value, pages=doc.page_count)
            try:
                kept = await self.checkpoints.load(ref, doc.page_count, always=plan.alone)
                pages = await self._pages(ref, doc, timer, kept, ticket, plan)
                assets = {}
                if self.assets_max is not None:
                    with timer.stage("decode"):
                        assets = await crop_figures(self.decoder, doc, pages, self.assets_max)
            finally:
                await self.decoder.close(doc)
            failure = unreadable(pages)
            if failure is not None:
                raise failure
            _warn_of_document(doc, pages)
            await plan.on_page(None)
            with timer.stage("engine"):
                pages = await engine_call(self.engine.finish_document(pages))
        return Reading(doc.format.value, pages, assets)

    async def _pages(self, ref: ObjectRef, doc: Document, timer: StageTimer,
                     kept: dict[int, PageResult], ticket: Ticket, plan: ReadPlan) -> list[PageResult]:
        results: list[PageResult | None] = [kept.get(i) for i in range(doc.page_count)]
        for index in sorted(plan.skip):
            if 0 <= index < doc.page_count and results[index] is None:
                results[index] = blamed_page(index, plan.attempts)
                log.warning("page_left_out", page=index, attempts=plan.attempts)
        shown = progress.current()
        if shown is not None:
            shown.pages(doc.page_count, done=sum(r is not None for r in results))
        checkpointed = plan.alone or self.checkpoints.wanted(doc.page_count)
        gate = asyncio.Semaphore(1 if plan.alone else self.page_concurrency)

        async def one(index: int) -> None:
            async with gate:
                await plan.on_page(index)
                await self.budget.acquire(ticket)
                try:
                    result = results[index] = await self.recogniser.page(doc, index, timer)
                except EngineCrashed as exc:
                    exc.page = index  # the page to blame in the lease
                    raise
                finally:
                    self.budget.release()
                if checkpointed:
                    await self.checkpoints.save(ref, result)
                self.metrics.pages.inc()
                if shown is not None:
                    shown.page_done()

        try:
            async with asyncio.TaskGroup() as group:
                for index in range(doc.page_count):
                    if results[index] is None:
                        group.create_task(one(index))
        except BaseExceptionGroup as group_error:
            # Report the first real cause, not the group: callers branch on its type.
            raise group_error.exceptions[0] from None
        return [r for r in results if r is not None]

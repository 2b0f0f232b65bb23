"""Decoding in supervised worker processes: PDFium and Pillow never run in the daemon.

A hostile file can do to a native decoder what a bad page does to an engine: recurse
until the stack overflows, inflate a stream of a few kilobytes into gigabytes, abort, or
spin in an endless content stream. In the daemon's process any of these would stall
every document or take the pod down. So the daemon decodes through WATCHER_DECODE_WORKERS
processes run by the same supervisor as the engines (engines/supervisor.py): a call past
WATCHER_DECODE_TIMEOUT kills its worker, a worker that dies is replaced, and each worker
caps its own address space at WATCHER_DECODE_MAX_MB, so that a bomb fails there as an
allocation that cannot be made. What failed is charged like an engine failure on that
page (`EngineCrashed`, blamed on the page; pipeline/isolation.py) or, for the document as
a whole, on the document; a file that is simply bad (corrupt, encrypted, too many pages)
is a `DocumentError` as before.

Each worker keeps the few documents it opened last, so that consecutive pages do not open
the file again, and lets go of any whose file the daemon has removed.
"""

from __future__ import annotations

import os
import resource
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pypdfium2 as pdfium

from watcher.core.errors import EngineCrashed
from watcher.core.pages import RenderedPage
from watcher.core.settings import Settings
from watcher.engines.child import ReaderSpec
from watcher.engines.supervisor import SupervisedEngine
from watcher.pipeline.decode import Decoder, Document, Format, Limits, open_document
from watcher.pipeline.textlayer import TextLayer

# Documents a worker keeps open: the one being read and the one before it.
KEPT_OPEN = 2
MB = 1024 * 1024


@dataclass(frozen=True)
class DecodeRequest:
    op: str  # "open", "render" or "text_layer"
    path: str
    size: int
    limits: Limits
    key: str
    index: int = 0


class DecodeReader:
    """The worker's side: opens, renders and reads text layers, under a memory cap."""

    batch_pages = 1

    def __init__(self, max_mb: int = 0) -> None:
        if max_mb > 0:
            limit = max_mb * MB
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        self._open: OrderedDict[str, Document] = OrderedDict()

    def warm(self) -> None:
        """PDFium and Pillow load and work: a one-page PDF made here, rendered."""
        pdf = pdfium.PdfDocument.new()
        pdf.new_page(200, 100)
        pdf[0].render(scale=0.5).to_pil().convert("RGB")
        pdf.close()

    def recognise_pages(self, requests: list[DecodeRequest]) -> list[Any]:
        return [self._answer(request) for request in requests]

    def finish_document(self, pages: list[Any]) -> list[Any]:
        return pages

    def _answer(self, request: DecodeRequest) -> Any:
        self._forget_removed()
        doc = self._document(request)
        if request.op == "open":
            return doc.format, doc.page_count, doc.warnings
        if request.op == "render":
            return doc.render(request.index)
        if request.op == "text_layer":
            return doc.text_layer(request.index)
        raise ValueError(f"unknown decode request {request.op!r}")

    def _document(self, request: DecodeRequest) -> Document:
        doc = self._open.get(request.path)
        if doc is None:
            doc = open_document(Path(request.path), request.size, request.limits, request.key)
            self._open[request.path] = doc
            while len(self._open) > KEPT_OPEN:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(request.path)
        return doc

    def _forget_removed(self) -> None:
        """The daemon removes a document's file when it is read: close it here too, so
        that its disk space is freed."""
        for path in [p for p in self._open if not os.path.exists(p)]:
            self._open.pop(path).close()


@dataclass
class RemoteDocument(Document):
    """A document open in the decode workers; the daemon holds only its description."""

    request: DecodeRequest
    format: Format
    page_count: int
    warnings: Sequence[dict[str, str]] = ()

    def close(self) -> None:
        pass


class ProcessDecoder(Decoder):
    """`Decoder` over the decode workers: the same calls, none of them in this process."""

    def __init__(self, workers: SupervisedEngine) -> None:
        self.workers = workers

    async def _call(self, request: DecodeRequest) -> Any:
        try:
            return await self.workers.call(request)
        except EngineCrashed as exc:
            # Said as what it was: the decoder, not the OCR engine, died on it.
            raise EngineCrashed(exc.reason, f"while decoding ({request.op}): {exc.detail}") from exc

    async def open(self, path: Path, size: int, limits: Limits, key: str) -> Document:
        request = DecodeRequest("open", str(path), size, limits, key)
        fmt, pages, warnings = await self._call(request)
        return RemoteDocument(request, fmt, pages, warnings)

    async def render(self, doc: Document, index: int) -> RenderedPage:
        assert isinstance(doc, RemoteDocument)
        page: RenderedPage = await self._call(replace(doc.request, op="render", index=index))
        return page

    async def text_layer(self, doc: Document, index: int) -> TextLayer | None:
        assert isinstance(doc, RemoteDocument)
        layer: TextLayer | None = await self._call(replace(doc.request, op="text_layer", index=index))
        return layer

    async def close(self, doc: Document) -> None:
        pass  # the workers let go once the file is removed, or when they open others


def decode_workers(settings: Settings) -> SupervisedEngine:
    """The supervised decode workers the daemon reads documents through."""
    return SupervisedEngine(
        ReaderSpec("watcher.pipeline.decode_workers:DecodeReader",
                   {"max_mb": settings.decode_max_mb}),
        name="decoder", model="pdfium+pillow", workers=settings.decode_workers,
        timeout=settings.decode_timeout, warm_timeout=settings.decode_timeout,
    )

"""Which documents are being read now and how far each has got: pages done of pages total.

A 500-page PDF takes many minutes; without this it looks stuck. The pipeline opens an
entry when it holds a document's lease (`Progress.reading`) and the reader, which knows
the page count once the document is decoded, counts pages into the entry of the task it
runs in (`current()`: page tasks inherit the context), so no stage passes it along.
/health, the status page and the watcher_document_pages gauges read `snapshot()`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from watcher.core.refs import ObjectRef


@dataclass
class DocumentProgress:
    """One document being read: its pages (None until decoded) and how many are done."""

    key: str
    etag: str
    started_at: float = field(default_factory=time.time)
    pages_total: int | None = None
    pages_done: int = 0

    def pages(self, total: int, done: int = 0) -> None:
        """The document is decoded: `total` pages, `done` of them already (checkpoints)."""
        self.pages_total, self.pages_done = total, min(done, total)

    def page_done(self) -> None:
        self.pages_done += 1

    def view(self) -> dict[str, object]:
        return {"key": self.key, "etag": self.etag, "pages_done": self.pages_done,
                "pages_total": self.pages_total,
                "seconds": round(time.time() - self.started_at, 1)}


_current: ContextVar[DocumentProgress | None] = ContextVar("watcher_reading", default=None)


def current() -> DocumentProgress | None:
    """The entry of the document the calling task reads, if any."""
    return _current.get()


class Progress:
    def __init__(self) -> None:
        self._reading: dict[tuple[str, str], DocumentProgress] = {}

    @contextmanager
    def reading(self, ref: ObjectRef) -> Iterator[DocumentProgress]:
        entry = DocumentProgress(ref.key, ref.etag)
        self._reading[(ref.key, ref.etag)] = entry
        token = _current.set(entry)
        try:
            yield entry
        finally:
            _current.reset(token)
            self._reading.pop((ref.key, ref.etag), None)

    def __len__(self) -> int:
        return len(self._reading)

    def pages(self) -> tuple[int, int]:
        """(done, total) over the documents being read whose page count is known."""
        known = [r for r in self._reading.values() if r.pages_total is not None]
        return sum(r.pages_done for r in known), sum(r.pages_total or 0 for r in known)

    def snapshot(self, limit: int) -> list[dict[str, object]]:
        """The `limit` longest-running documents being read, oldest first."""
        oldest = sorted(self._reading.values(), key=lambda r: r.started_at)[:limit]
        return [r.view() for r in oldest]

"""Which documents are being read now and how far each has got: pages done of pages total.

A 500-page PDF takes many minutes; without this it looks stuck. The pipeline opens an
entry when it holds a document's lease (`Progress.reading`) and the reader, which knows
the page count once the document is decoded, counts pages into the entry of the task it
runs in (`current()`: page tasks inherit the context), so no stage passes it along.
/health, the status page and the watcher_document_pages gauges read `snapshot()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from watcher.core.refs import ObjectRef

# The status page's throughput: 30 bins of 20 seconds, the last ten minutes.
BIN_SECONDS = 20
BINS = 30


class Bins:
    """Counts per BIN_SECONDS over the last BINS of them (what the status page charts)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._counts: dict[int, int] = {}  # bin start -> count

    def _start(self, when: float) -> int:
        return int(when // BIN_SECONDS) * BIN_SECONDS

    def add(self, count: int = 1) -> None:
        now = self.clock()
        start = self._start(now)
        self._counts[start] = self._counts.get(start, 0) + count
        for old in [s for s in self._counts if s <= start - BIN_SECONDS * BINS]:
            del self._counts[old]

    def series(self) -> list[tuple[int, int]]:
        """(bin start, count) of every bin of the window, oldest first, empty ones too."""
        newest = self._start(self.clock())
        return [(s, self._counts.get(s, 0))
                for s in (newest - BIN_SECONDS * i for i in reversed(range(BINS)))]


@dataclass
class DocumentProgress:
    """One document being read: its pages (None until decoded) and how many are done."""

    key: str
    etag: str
    started_at: float = field(default_factory=time.time)
    pages_total: int | None = None
    pages_done: int = 0
    read: Bins | None = None  # every page read, of all documents

    def pages(self, total: int, done: int = 0) -> None:
        """The document is decoded: `total` pages, `done` of them already (checkpoints)."""
        self.pages_total, self.pages_done = total, min(done, total)

    def page_done(self) -> None:
        self.pages_done += 1
        if self.read is not None:
            self.read.add()

    def view(self) -> dict[str, object]:
        return {"key": self.key, "etag": self.etag, "pages_done": self.pages_done,
                "pages_total": self.pages_total,
                "seconds": round(time.time() - self.started_at, 1)}


_current: ContextVar[DocumentProgress | None] = ContextVar("watcher_reading", default=None)


def current() -> DocumentProgress | None:
    """The entry of the document the calling task reads, if any."""
    return _current.get()


class Progress:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._reading: dict[tuple[str, str], DocumentProgress] = {}
        self.pages_read = Bins(clock)

    @contextmanager
    def reading(self, ref: ObjectRef) -> Iterator[DocumentProgress]:
        entry = DocumentProgress(ref.key, ref.etag, read=self.pages_read)
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

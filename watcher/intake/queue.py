"""The work queue: bounded, deduplicated by key + ETag, one version of a key at a time."""

from __future__ import annotations

import asyncio
from collections import deque

from watcher.core.refs import ObjectRef


class WorkQueue:
    """Two lanes: work found by discovery, and urgent work that must not wait behind it.

    A document whose lease another replica held comes back through the urgent lane when
    that lease expires, so a crashed replica's work is taken over within a lease period
    however long the backlog is. A key + ETag is taken at most once while queued or in
    flight; a copy left in the other lane is skipped.

    At most one version of a key is in flight: a new upload offered while the previous
    version runs waits (parked) until that run ends, then goes first. Two versions of a
    key never race for its lease or its results in one process.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._normal: deque[ObjectRef] = deque()
        self._urgent: deque[ObjectRef] = deque()
        self._pending: set[tuple[str, str]] = set()  # queued, parked or in flight
        self._queued: set[tuple[str, str]] = set()  # in a lane or parked, not yet taken
        self._running: set[str] = set()  # keys in flight
        self._parked: dict[str, list[ObjectRef]] = {}  # key -> versions waiting for it
        self._ready = asyncio.Event()

    @staticmethod
    def _id(ref: ObjectRef) -> tuple[str, str]:
        return (ref.key, ref.etag)

    def offer(self, ref: ObjectRef) -> bool:
        """Queue `ref` unless it is already queued or in flight; False when full or known."""
        if self._id(ref) in self._pending or len(self._normal) >= self.maxsize:
            return False
        self._normal.append(ref)
        self._pending.add(self._id(ref))
        self._queued.add(self._id(ref))
        self._ready.set()
        return True

    def offer_urgent(self, ref: ObjectRef) -> bool:
        """Queue `ref` ahead of everything discovery found; False while it is in flight."""
        ref_id = self._id(ref)
        if ref_id in self._pending and ref_id not in self._queued:
            return False
        self._urgent.append(ref)
        self._pending.add(ref_id)
        self._queued.add(ref_id)
        self._ready.set()
        return True

    async def take(self) -> ObjectRef:
        while True:
            while self._urgent or self._normal:
                ref = self._urgent.popleft() if self._urgent else self._normal.popleft()
                ref_id = self._id(ref)
                parked = self._parked.get(ref.key, ())
                if ref_id not in self._queued or any(self._id(p) == ref_id for p in parked):
                    continue  # taken from the other lane already, or parked
                if ref.key in self._running:
                    self._parked.setdefault(ref.key, []).append(ref)
                    continue
                self._queued.discard(ref_id)
                self._running.add(ref.key)
                return ref
            self._ready.clear()
            await self._ready.wait()

    def finish(self, ref: ObjectRef) -> None:
        """`ref`'s run ended: forget it, so that the next discovery may offer it again if it
        is not done, and let a version of its key that waited go first."""
        self._pending.discard(self._id(ref))
        self._running.discard(ref.key)
        waiting = self._parked.pop(ref.key, [])
        if waiting:
            self._urgent.extendleft(reversed(waiting))
            self._ready.set()

    def is_pending(self, ref: ObjectRef) -> bool:
        return self._id(ref) in self._pending

    def qsize(self) -> int:
        return len(self._queued)

    def unfinished(self) -> int:
        """Documents queued or in flight."""
        return len(self._pending)

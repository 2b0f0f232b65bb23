"""The work queue: bounded, deduplicated by key + ETag across queued and in-flight items."""

from __future__ import annotations

import asyncio

from watcher.storage import ObjectRef


class WorkQueue:
    def __init__(self, maxsize: int) -> None:
        self._queue: asyncio.Queue[ObjectRef] = asyncio.Queue(maxsize)
        self._pending: set[tuple[str, str]] = set()

    @staticmethod
    def _id(ref: ObjectRef) -> tuple[str, str]:
        return (ref.key, ref.etag)

    def offer(self, ref: ObjectRef) -> bool:
        """Queue `ref` unless it is already queued or in flight; False when full or known."""
        if self._id(ref) in self._pending or self._queue.full():
            return False
        self._queue.put_nowait(ref)
        self._pending.add(self._id(ref))
        return True

    async def take(self) -> ObjectRef:
        return await self._queue.get()

    def finish(self, ref: ObjectRef) -> None:
        """Forget `ref`, so that the next discovery may offer it again if it is not done."""
        self._pending.discard(self._id(ref))

    def is_pending(self, ref: ObjectRef) -> bool:
        return self._id(ref) in self._pending

    def qsize(self) -> int:
        return self._queue.qsize()

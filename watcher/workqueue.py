"""The work queue: bounded, deduplicated by key + ETag across queued and in-flight items;
and the page budget that decides how many documents and pages are in flight."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from watcher.storage import ObjectRef

ROOM_RECHECK_SECONDS = 0.1


class WorkQueue:
    """Two lanes: work found by discovery, and urgent work that must not wait behind it.

    A document whose lease another replica held comes back through the urgent lane when
    that lease expires, so a crashed replica's work is taken over within a lease period
    however long the backlog is. A key + ETag is taken at most once while queued or in
    flight; a copy left in the other lane is skipped.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._normal: deque[ObjectRef] = deque()
        self._urgent: deque[ObjectRef] = deque()
        self._pending: set[tuple[str, str]] = set()  # queued or in flight
        self._queued: set[tuple[str, str]] = set()  # in a lane, not yet taken
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
                if self._id(ref) in self._queued:
                    self._queued.discard(self._id(ref))
                    return ref
            self._ready.clear()
            await self._ready.wait()

    def finish(self, ref: ObjectRef) -> None:
        """Forget `ref`, so that the next discovery may offer it again if it is not done."""
        self._pending.discard(self._id(ref))

    def is_pending(self, ref: ObjectRef) -> bool:
        return self._id(ref) in self._pending

    def qsize(self) -> int:
        return len(self._queued)

    def unfinished(self) -> int:
        """Documents queued or in flight."""
        return len(self._pending)


class PageBudget:
    """Rendered pages in flight across all documents, as many as the engine wants now.

    A VLM engine's wish follows its adaptive request limit, so rendering stays ahead of
    the server whatever its size; engines without a wish (the CPU engine) are bounded by
    WATCHER_MAX_INFLIGHT_DOCUMENTS x WATCHER_PAGE_CONCURRENCY alone. A document is
    admitted with a reservation for its first page, so that a crowd of idle workers can
    not all start documents on the same free page.
    """

    def __init__(self, wanted: Callable[[], int | None]) -> None:
        self._wanted = wanted
        self.in_use = 0
        self.reserved = 0
        self._changed = asyncio.Event()

    def _room(self) -> bool:
        wanted = self._wanted()
        return wanted is None or self.in_use + self.reserved < wanted

    async def _wait_for_room(self) -> None:
        while not self._room():
            with contextlib.suppress(TimeoutError):
                # The wish moves with the engine's limit, which sends no notice.
                await asyncio.wait_for(self._changed.wait(), ROOM_RECHECK_SECONDS)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def admit(self) -> Ticket:
        await self._wait_for_room()
        self.reserved += 1
        return Ticket(self)

    async def acquire(self, ticket: Ticket) -> None:
        if ticket.reservation:
            ticket.reservation = False
            self.reserved -= 1
        else:
            await self._wait_for_room()
        self.in_use += 1

    def release(self) -> None:
        self.in_use -= 1
        self._notify()


class Ticket:
    """One admitted document's claim on the page budget."""

    def __init__(self, budget: PageBudget, reservation: bool = True) -> None:
        self.budget = budget
        self.reservation = reservation

    def close(self) -> None:
        if self.reservation:
            self.reservation = False
            self.budget.reserved -= 1
            self.budget._notify()

"""The page budget: how many documents and rendered pages are in flight at once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

ROOM_RECHECK_SECONDS = 0.1


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

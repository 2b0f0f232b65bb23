"""Isolation: a suspect document runs alone on its replica.

A document with crashes on record (the engine failed on it, or a pod died while it was
in flight) is a suspect: the death may have been its own doing, or it was caught in
another document's. Beside others, a pod-killing document takes everything in flight
down with it, and each of them is charged an attempt; alone, only it is charged. So
every document passes this gate before its claim, and a suspect runs only once nothing
else on the replica holds a lease: one that finds company gives its lease back (keeping
its count), waits holding nothing while the others finish and nothing new is claimed,
then claims again and runs alone.

Alone means the whole replica, not one engine worker: what kills a pod (the OOM killer,
a native fault while decoding, a driver error) takes every worker with it.

Documents waiting at the gate give up their page-budget reservation (budget.py), so that
they can never keep the pages the documents they wait for need.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from watcher.core.refs import ObjectRef
from watcher.pipeline.budget import Ticket


class Isolation:
    def __init__(self) -> None:
        self._inside = 0  # documents past the gate: claiming, running or finishing
        self._alone = False  # a suspect waits for the replica to empty, or runs alone
        self._changed = asyncio.Event()
        self.suspect: ObjectRef | None = None  # the one running alone (for /health)

    @property
    def inside(self) -> int:
        return self._inside

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _until(self, holds: Callable[[], bool]) -> None:
        while not holds():
            await self._changed.wait()

    @asynccontextmanager
    async def admitted(self, ref: ObjectRef, ticket: Ticket) -> AsyncIterator[Entry]:
        """Past the gate for one document's claim and run; waits while a suspect is alone."""
        if self._alone:
            ticket.close()
            await self._until(lambda: not self._alone)
        self._inside += 1
        entry = Entry(self, ref, ticket)
        try:
            yield entry
        finally:
            self._inside -= 1
            if entry.alone:
                self._alone = False
                self.suspect = None
            self._notify()


class Entry:
    """One document past the gate."""

    def __init__(self, isolation: Isolation, ref: ObjectRef, ticket: Ticket) -> None:
        self.isolation = isolation
        self.ref = ref
        self.ticket = ticket
        self.alone = False

    def alone_now(self) -> bool:
        """True when nothing else is past the gate: this document is alone from now on."""
        iso = self.isolation
        if iso._inside == 1 and not iso._alone:
            self._take()
            return True
        return False

    async def wait_alone(self) -> None:
        """Step out (the caller holds no lease now), wait for the replica to empty, and
        come back in alone."""
        iso = self.isolation
        iso._inside -= 1
        iso._notify()
        self.ticket.close()
        try:
            await iso._until(lambda: not iso._alone)
            self._take()
            await iso._until(lambda: iso._inside == 0)
        finally:
            # Counted in again, cancelled or not: the way out of `admitted` counts it out
            # and, if it was alone, opens the gate.
            iso._inside += 1

    def _take(self) -> None:
        self.alone = True
        self.isolation._alone = True
        self.isolation.suspect = self.ref

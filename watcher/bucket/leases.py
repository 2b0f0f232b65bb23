"""Leases: claim objects in S3 that keep replicas from working on the same document.

A lease is a small JSON object written with `If-None-Match: *`; taking over an expired
one uses `If-Match` on the lease's ETag, so exactly one replica wins any race. A holder
renews it while it works and deletes it when done, both conditional on the ETag of its
own last write, so that it never removes or overwrites a lease another replica took
over. In `shard` mode (stores without conditional writes) discovery already filtered
keys by hash and the same object is written without conditions.

A lease is a fence, not a promise: its holder treats it as lost once the expiry it last
wrote has passed without a renewal (S3 away, the process stalled), and renews it with
`If-Match` right before anything it publishes, so a holder that was cut off finds out
before it writes, not after. One process holds at most one live lease per source key:
a second version of a key waits for the first to finish instead of taking its lease.

The lease is also where a document's failed attempts are counted, so that every replica
and every restart sees them: an engine crash rewrites it as released with `crashes` one
higher, and a lease whose holder vanished without releasing it (the pod was killed, its
node died) is taken over with `crashes` one higher too. A document whose count reached
WATCHER_MAX_ATTEMPTS is given up, even when every attempt took the whole pod down.

It also says which page to blame. A document with crashes on record is read alone and
page by page (pipeline/isolation.py), its holder writing the page it is on into the
lease (`working_on`) before each one; a holder that dies leaves that page behind, and the
next holder adds it to `blamed`, as does a crash the engine reports for one page. On the
document's last attempt the blamed pages are not read again (pipeline/document.py).

A holder is known dead before its lease expires when it ran on this host under this
replica id and its process is gone (a restarted container), so a restarted daemon takes
its own documents back at once; a lease this very process wrote and no longer holds (a
release that failed while S3 was away) is simply taken back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from watcher.bucket.names import Names
from watcher.bucket.storage import PreconditionFailed, Storage, StorageUnavailable
from watcher.core.identity import Identity
from watcher.core.logs import get_logger
from watcher.core.refs import ObjectRef
from watcher.core.settings import ClaimMode, Settings

log = get_logger("watcher.bucket.leases")

# Reasons kept per document: enough to explain an `engine_failed` record.
HISTORY_LIMIT = 10
# Pages blamed per document: more than this many poison pages is a poison document.
BLAMED_LIMIT = 100
# Tries at deleting a lease that S3 refused to delete, backing off to a minute: about an hour.
LATER_ATTEMPTS = 65
LATER_FIRST_SECONDS = 1.0
# A holder counts its lease lost this share of a lease period before the expiry it wrote,
# so that clocks a little apart never see two holders at once.
EXPIRY_MARGIN = 0.2


@dataclass(frozen=True)
class Held:
    """Another holder has the claim until `expires_at` (epoch seconds)."""

    owner: str
    expires_at: float


class LeaseLost(Exception):
    """The claim expired or another replica took it over; nothing may be published."""


@dataclass
class LeaseRecord:
    """A lease object's content."""

    owner: str
    source_key: str
    source_etag: str
    expires_at: float
    crashes: int = 0
    history: list[str] = field(default_factory=list)
    released: bool = False
    host: str = ""
    pid: int = 0
    incarnation: str = ""
    page: int | None = None  # the page its holder is reading alone, if it says
    blamed: list[int] = field(default_factory=list)  # pages that took a worker or the pod down

    @classmethod
    def parse(cls, body: bytes) -> LeaseRecord | None:
        try:
            data: Any = json.loads(body)
            return cls(
                owner=str(data.get("owner", "")),
                source_key=str(data.get("source_key", "")),
                source_etag=str(data.get("source_etag", "")),
                expires_at=float(data["expires_at"]),
                crashes=int(data.get("crashes", 0)),
                history=[str(h) for h in data.get("history", [])][-HISTORY_LIMIT:],
                released=bool(data.get("released", False)),
                host=str(data.get("host", "")),
                pid=int(data.get("pid", 0)),
                incarnation=str(data.get("incarnation", "")),
                page=None if data.get("page") is None else int(data["page"]),
                blamed=sorted({int(p) for p in data.get("blamed", [])})[:BLAMED_LIMIT],
            )
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
            return None

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode()


@dataclass(frozen=True)
class Inherited:
    """What a new holder takes over from the lease it replaces."""

    crashes: int = 0
    history: list[str] = field(default_factory=list)
    blamed: list[int] = field(default_factory=list)


def _blame(blamed: list[int], page: int | None) -> list[int]:
    return blamed if page is None else sorted({*blamed, page})[:BLAMED_LIMIT]


class Lease:
    """A held claim on one source version.

    `valid()` turns false when another replica took the claim, or when the expiry of our
    last successful write has (nearly) passed; `fence()` renews it on the spot, which is
    what a holder does right before it publishes.
    """

    def __init__(self, leases: Leases, ref: ObjectRef, etag: str, expires_at: float,
                 inherited: Inherited) -> None:
        self.leases = leases
        self.ref = ref
        self.etag = etag
        self.expires_at = expires_at
        self.crashes = inherited.crashes
        self.history = inherited.history
        self.blamed = inherited.blamed
        self.page: int | None = None
        self.lost = False
        self._ended = False
        # One write of the lease at a time: a fence and a renewal sent together would race
        # each other's If-Match, and the loser would read as a lease taken over.
        self._writing = asyncio.Lock()
        self._renewer: asyncio.Task[None] | None = asyncio.create_task(
            self._renew_forever(), name=f"lease:{ref.key}"
        )

    def valid(self) -> bool:
        if self.lost:
            return False
        margin = EXPIRY_MARGIN * self.leases.settings.lease_seconds
        return self.leases.identity.clock() < self.expires_at - margin

    async def fence(self) -> None:
        """Renew now, conditionally on our last write; LeaseLost if the claim is gone.

        Raises StorageUnavailable when S3 cannot be asked: nothing may be published then
        either, and the document is tried again later."""
        if not self.valid():
            self.lost = True
            raise LeaseLost(f"{self.ref.key}: the lease expired before it could be renewed")
        await self._renew()
        if self.lost:
            raise LeaseLost(f"{self.ref.key}: another replica took the lease over")

    async def working_on(self, page: int | None) -> None:
        """Say in the lease which page this holder reads now (a fence, too), so that a
        death on it is blamed on that page; None once it reads no page."""
        self.page = page
        await self.fence()

    async def _renew(self) -> None:
        async with self._writing:
            if self.lost or self._ended:
                return
            try:
                # A renewal whose answer was lost went through: read back, not lost.
                await self._on_ours(self._write_renewed)
            except PreconditionFailed:
                self.lost = True
                log.warning("lease_lost", key=self.ref.key)

    async def _write_renewed(self, etag: str) -> None:
        self.etag, self.expires_at = await self.leases.write(self.ref, self._record(), if_match=etag)

    async def _renew_forever(self) -> None:
        interval = self.leases.settings.lease_seconds / 3
        while not self.lost:
            await asyncio.sleep(interval)
            try:
                await self._renew()
            except StorageUnavailable as exc:
                # Keep trying; `valid()` turns false once the lease runs out.
                log.warning("lease_renew_failed", key=self.ref.key, error=str(exc))
            except Exception as exc:
                # Whatever it was, the renewing goes on; publishing checks `valid()`.
                log.error("lease_renew_error", key=self.ref.key,
                          error=f"{type(exc).__name__}: {exc}", exc_info=True)

    def _record(self, released: bool = False) -> LeaseRecord:
        return self.leases.record(self.ref, Inherited(self.crashes, self.history, self.blamed),
                                  released, None if released else self.page)

    async def _stop_renewing(self) -> None:
        if self._renewer is not None:
            # Under the lock: the renewer is asleep or waiting, never half-way through a
            # write whose outcome we would not know.
            async with self._writing:
                self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None

    def _end(self) -> bool:
        """Mark the lease ended; False when it already was (or was lost)."""
        self.leases.forget(self)
        if self._ended or self.lost:
            return False
        self._ended = True
        return True

    async def _on_ours(self, write: Callable[[str], Awaitable[Any]]) -> None:
        """`write(etag)` conditional on our last write; when S3 says the lease changed, it
        is read back: still ours (a write whose answer was cut off, or cancelled under
        way, went through after all), `write` goes again on its current ETag."""
        try:
            await write(self.etag)
        except PreconditionFailed:
            current = await self.leases.ours(self.ref)
            if current is None:
                raise
            await write(current)

    async def record_crash(self, reason: str, page: int | None = None) -> int:
        """Count a failed attempt in S3 (blaming `page` when the engine said which page it
        failed on) and free the claim for the retry; returns the count."""
        self.crashes += 1
        self.history = [*self.history, reason][-HISTORY_LIMIT:]
        self.blamed = _blame(self.blamed, page)
        await self._stop_renewing()
        async with self._writing:
            if self._end():
                try:
                    await self._on_ours(self._write_released)
                except PreconditionFailed:
                    self.lost = True
        return self.crashes

    async def _write_released(self, etag: str) -> None:
        await self.leases.write(self.ref, self._record(released=True), if_match=etag)

    async def _delete(self, etag: str) -> None:
        await self.leases.delete(self.ref, etag)

    async def release(self) -> None:
        """Give the claim up; a document with crashes on record keeps them for the retry."""
        await self._stop_renewing()
        async with self._writing:
            if not self._end():
                return
            try:
                await self._on_ours(self._write_released if self.crashes else self._delete)
            except PreconditionFailed:
                pass  # taken over since: the lease is another holder's now
            except StorageUnavailable as exc:
                log.warning("lease_release_failed", key=self.ref.key, error=str(exc))
                if not self.crashes:
                    self.leases.delete_later(self.ref, self.etag)

    async def finish(self) -> None:
        """The version has its result or error record: nothing about it needs keeping."""
        await self._stop_renewing()
        async with self._writing:
            if not self._end():
                return
            try:
                await self._on_ours(self._delete)
            except PreconditionFailed:
                pass  # taken over since: the lease is another holder's now
            except StorageUnavailable as exc:
                log.warning("lease_release_failed", key=self.ref.key, error=str(exc))
                self.leases.delete_later(self.ref, self.etag)


class Leases:
    def __init__(self, storage: Storage, settings: Settings, names: Names,
                 identity: Identity | None = None) -> None:
        self.storage = storage
        self.settings = settings
        self.names = names
        self.identity = identity or Identity(settings.replica_id)
        # Stores without conditional writes get the same objects, written unconditionally.
        self.conditional = settings.claim_mode is ClaimMode.LEASE
        self._live: dict[str, Lease] = {}  # source key -> the lease this process holds on it
        self._later: set[asyncio.Task[None]] = set()

    def holding(self, key: str) -> bool:
        return key in self._live

    def forget(self, lease: Lease) -> None:
        if self._live.get(lease.ref.key) is lease:
            del self._live[lease.ref.key]

    def record(self, ref: ObjectRef, inherited: Inherited, released: bool,
               page: int | None = None) -> LeaseRecord:
        me = self.identity
        return LeaseRecord(
            owner=me.replica, source_key=ref.key, source_etag=ref.etag,
            expires_at=0.0 if released else me.clock() + self.settings.lease_seconds,
            crashes=inherited.crashes, history=inherited.history, released=released,
            host=me.host, pid=me.pid, incarnation=me.incarnation,
            page=page, blamed=inherited.blamed,
        )

    async def write(self, ref: ObjectRef, record: LeaseRecord, if_match: str | None = None,
                    create: bool = False) -> tuple[str, float]:
        """Write `record`; its ETag and the expiry it gives the holder."""
        etag = await self.storage.put(
            self.names.lease(ref.key), record.encode(), "application/json",
            if_none_match=create and self.conditional,
            if_match=if_match if self.conditional else None,
        )
        return etag, record.expires_at

    async def ours(self, ref: ObjectRef) -> str | None:
        """The lease's current ETag when it is still this process's claim on `ref`."""
        current = await self.storage.get_bytes(self.names.lease(ref.key))
        if current is None:
            return None
        record = LeaseRecord.parse(current[0])
        me = self.identity
        if (record is None or record.owner != me.replica or record.incarnation != me.incarnation
                or record.source_etag != ref.etag):
            return None
        return current[1]

    async def delete(self, ref: ObjectRef, etag: str) -> None:
        """Remove our claim while the lease is still our write `etag` (PreconditionFailed if
        not). A store that ignores If-Match on DELETE gets a released record instead, by a
        conditional PUT, which it does honour: a DELETE there could remove a lease another
        replica took a moment before. The lister sweeps such records later (discovery)."""
        if self.conditional and not self.storage.conditions.delete:
            await self.write(ref, self.record(ref, Inherited(), released=True), if_match=etag)
            return
        await self.storage.delete(self.names.lease(ref.key), if_match=etag if self.conditional else None)

    def delete_later(self, ref: ObjectRef, etag: str) -> None:
        """A lease we could not delete (S3 away) is deleted once S3 is back."""
        task = asyncio.create_task(self._delete_eventually(ref, etag), name=f"lease-delete:{ref.key}")
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _delete_eventually(self, ref: ObjectRef, etag: str) -> None:
        await asyncio.sleep(LATER_FIRST_SECONDS)  # S3 has just failed: give it a moment
        try:
            async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(LATER_ATTEMPTS),
                    wait=wait_random_exponential(multiplier=LATER_FIRST_SECONDS, max=60.0),
                    retry=retry_if_exception_type(StorageUnavailable)):
                with attempt:
                    try:
                        await self.delete(ref, etag)
                    except PreconditionFailed:
                        return  # another holder's lease by now: not ours to delete
                    log.info("lease_deleted_after_all", key=ref.key)
        except RetryError:
            log.warning("lease_left_behind", key=ref.key, hint="the lister sweeps it later")

    async def close(self) -> None:
        for task in list(self._later):
            task.cancel()
        await asyncio.gather(*self._later, return_exceptions=True)

    async def acquire(self, ref: ObjectRef) -> Lease | Held | None:
        """A lease on `ref`; Held when another holder has it; None when a race with another
        replica was lost (the next poll tries again)."""
        mine = self._live.get(ref.key)
        if mine is not None:
            # One live claim per key per process: another version waits for this one.
            return Held(self.identity.replica, mine.expires_at)
        if self.conditional:
            try:
                return self._hold(ref, *await self.write(ref, self.record(ref, Inherited(), False),
                                                         create=True), Inherited())
            except PreconditionFailed:
                pass
        current = await self.storage.get_bytes(self.names.lease(ref.key))
        if current is None:
            if not self.conditional:
                return self._hold(ref, *await self.write(ref, self.record(ref, Inherited(), False)),
                                  Inherited())
            return None  # released between our two calls; the next poll tries again
        body, etag = current
        previous = LeaseRecord.parse(body)
        inherited = self._carried_over(ref, previous)
        if inherited is None:
            assert previous is not None
            log.info("claim_held_elsewhere", key=ref.key, owner=previous.owner,
                     expires_in=round(previous.expires_at - self.identity.clock(), 1))
            return Held(previous.owner, previous.expires_at)
        try:
            written = await self.write(ref, self.record(ref, inherited, False), if_match=etag)
        except PreconditionFailed:
            return None
        if (previous is not None and previous.owner != self.identity.replica) or inherited.crashes:
            log.info("claim_taken_over", key=ref.key, previous_owner=previous and previous.owner,
                     crashes=inherited.crashes, blamed_pages=inherited.blamed or None)
        return self._hold(ref, *written, inherited)

    def _hold(self, ref: ObjectRef, etag: str, expires_at: float, inherited: Inherited) -> Lease:
        lease = Lease(self, ref, etag, expires_at, inherited)
        self._live[ref.key] = lease
        return lease

    def holder_is_dead(self, record: LeaseRecord) -> bool:
        """The holder ran here, as this replica, in a process that no longer exists."""
        me = self.identity
        if record.owner != me.replica or record.host != me.host:
            return False
        return me.left_by_dead_process(record.pid, record.incarnation)

    def _carried_over(self, ref: ObjectRef, previous: LeaseRecord | None) -> Inherited | None:
        """What a new holder inherits, or None while the holder is alive."""
        if previous is None:
            return Inherited()  # unreadable: treat as expired, nothing to inherit
        same_version = previous.source_etag == ref.etag
        kept = Inherited(previous.crashes, previous.history, previous.blamed) if same_version else Inherited()
        if previous.released:
            return kept
        me = self.identity
        if previous.incarnation == me.incarnation and previous.owner == me.replica:
            # Ours and no longer held (`acquire` checked): a release that failed while
            # S3 was away.
            return kept
        dead = self.holder_is_dead(previous)
        if not dead and previous.expires_at > me.clock():
            return None
        if not same_version:
            return Inherited()
        why = "died" if dead else "stopped renewing its lease (killed or cut off)"
        on = "" if previous.page is None else f" on page {previous.page + 1}"
        history = [*kept.history, f"replica {previous.owner} {why} while processing{on}"]
        return Inherited(kept.crashes + 1, history[-HISTORY_LIMIT:], _blame(kept.blamed, previous.page))

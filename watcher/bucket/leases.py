"""Claim: skip finished versions and take a lease so that replicas never share work.

A lease is a small JSON object written with `If-None-Match: *`; taking over an expired
one uses `If-Match` on the lease's ETag, so exactly one replica wins any race. A holder
renews it while it works, and deletes it when done. In `shard` mode (for stores without
conditional writes) discovery already filtered keys by hash and the same object is
written without conditions.

The lease is also where a document's failed attempts are counted, so that every replica
and every restart sees them: an engine crash rewrites it as released with `crashes` one
higher, and a lease whose holder vanished without releasing it (the pod was killed, its
node died) is taken over with `crashes` one higher too. A document whose count reached
WATCHER_MAX_ATTEMPTS is given up, even when every attempt took the whole pod down.

A holder is known dead before its lease expires when it ran on this host under this
replica id and its process is gone (a restarted container), so a restarted daemon takes
its own documents back at once; a lease this very process wrote (a release that failed
while S3 was away) is simply taken back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
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
from watcher.bucket.storage import ObjectRef, PreconditionFailed, Storage, StorageUnavailable
from watcher.core.identity import HOST, INCARNATION, left_by_dead_process
from watcher.core.logs import get_logger
from watcher.core.settings import ClaimMode, Settings

log = get_logger("watcher.bucket.leases")

# Reasons kept per document: enough to explain an `engine_failed` record.
HISTORY_LIMIT = 10
# Tries at deleting a lease that S3 refused to delete, backing off to a minute: about an hour.
LATER_ATTEMPTS = 65
LATER_FIRST_SECONDS = 1.0


@dataclass(frozen=True)
class Held:
    """Another live replica holds the claim until `expires_at` (epoch seconds)."""

    owner: str
    expires_at: float


class LeaseLost(Exception):
    """Another replica took the claim over; our result must not be published."""


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
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode()


def holder_is_dead(record: LeaseRecord, replica_id: str) -> bool:
    """The holder ran here, as this replica, in a process that no longer exists."""
    if record.owner != replica_id or record.host != HOST:
        return False
    return left_by_dead_process(record.pid, record.incarnation)


class Lease:
    """A held claim on one source version; `lost` turns true if another replica took it."""

    def __init__(
        self, leases: Leases, ref: ObjectRef, etag: str | None, crashes: int, history: list[str]
    ) -> None:
        self.leases = leases
        self.ref = ref
        self.etag = etag
        self.crashes = crashes
        self.history = history
        self.lost = False
        self._done = False
        self._renewer: asyncio.Task[None] | None = asyncio.create_task(
            self._renew_forever(), name=f"lease:{ref.key}"
        )

    async def _renew_forever(self) -> None:
        interval = self.leases.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                self.etag = await self.leases.write(self.ref, self._record(), if_match=self.etag)
            except PreconditionFailed:
                self.lost = True
                log.warning("lease_lost", key=self.ref.key)
                return
            except StorageUnavailable as exc:
                # Keep trying; the lease only expires after lease_seconds.
                log.warning("lease_renew_failed", key=self.ref.key, error=str(exc))

    def _record(self, released: bool = False) -> LeaseRecord:
        return self.leases.record(self.ref, self.crashes, self.history, released)

    async def _stop_renewing(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None

    async def record_crash(self, reason: str) -> int:
        """Count a failed attempt in S3 and free the claim for the retry; returns the count."""
        self.crashes += 1
        self.history = [*self.history, reason][-HISTORY_LIMIT:]
        await self._stop_renewing()
        if not self.lost:
            try:
                self.etag = await self.leases.write(self.ref, self._record(released=True),
                                                    if_match=self.etag)
            except PreconditionFailed:
                self.lost = True
            else:
                self._done = True
        return self.crashes

    async def release(self) -> None:
        """Give the claim up; a document with crashes on record keeps them for the retry."""
        await self._stop_renewing()
        if self._done or self.lost:
            return
        self._done = True
        try:
            if self.crashes:
                await self.leases.write(self.ref, self._record(released=True), if_match=self.etag)
            else:
                await self.leases.storage.delete(self.leases.names.lease(self.ref.key))
        except (StorageUnavailable, PreconditionFailed) as exc:
            log.warning("lease_release_failed", key=self.ref.key, error=str(exc))
            if not self.crashes and isinstance(exc, StorageUnavailable):
                self.leases.delete_later(self.ref)

    async def finish(self) -> None:
        """The version has its result or error record: nothing about it needs keeping."""
        await self._stop_renewing()
        if self.lost:
            return
        self._done = True
        try:
            await self.leases.storage.delete(self.leases.names.lease(self.ref.key))
        except StorageUnavailable as exc:
            log.warning("lease_release_failed", key=self.ref.key, error=str(exc))
            self.leases.delete_later(self.ref)


class Leases:
    def __init__(self, storage: Storage, settings: Settings, names: Names) -> None:
        self.storage = storage
        self.settings = settings
        self.names = names
        # Stores without conditional writes get the same objects, written unconditionally.
        self.conditional = settings.claim_mode is ClaimMode.LEASE
        self._later: set[asyncio.Task[None]] = set()

    def delete_later(self, ref: ObjectRef) -> None:
        """A lease we could not delete (S3 away) is deleted once S3 is back."""
        task = asyncio.create_task(self._delete_eventually(ref), name=f"lease-delete:{ref.key}")
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _delete_eventually(self, ref: ObjectRef) -> None:
        await asyncio.sleep(LATER_FIRST_SECONDS)  # S3 has just failed: give it a moment
        try:
            async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(LATER_ATTEMPTS),
                    wait=wait_random_exponential(multiplier=LATER_FIRST_SECONDS, max=60.0),
                    retry=retry_if_exception_type(StorageUnavailable)):
                with attempt:
                    await self._delete_if_ours(ref)
        except RetryError:
            log.warning("lease_left_behind", key=ref.key, hint="the lister sweeps it later")

    async def _delete_if_ours(self, ref: ObjectRef) -> None:
        key = self.names.lease(ref.key)
        current = await self.storage.get_bytes(key)
        record = LeaseRecord.parse(current[0]) if current else None
        # Only our own record of this version: once it expired, another replica may have
        # taken the key for a newer version.
        if (record is None or record.owner != self.settings.replica_id
                or record.incarnation != INCARNATION or record.source_etag != ref.etag):
            return
        await self.storage.delete(key)
        log.info("lease_deleted_after_all", key=ref.key)

    async def close(self) -> None:
        for task in list(self._later):
            task.cancel()
        await asyncio.gather(*self._later, return_exceptions=True)

    def record(self, ref: ObjectRef, crashes: int, history: list[str], released: bool) -> LeaseRecord:
        return LeaseRecord(
            owner=self.settings.replica_id, source_key=ref.key, source_etag=ref.etag,
            expires_at=0.0 if released else time.time() + self.settings.lease_seconds,
            crashes=crashes, history=history, released=released,
            host=HOST, pid=os.getpid(), incarnation=INCARNATION,
        )

    async def write(
        self, ref: ObjectRef, record: LeaseRecord, if_match: str | None = None, create: bool = False
    ) -> str:
        return await self.storage.put(
            self.names.lease(ref.key), record.encode(), "application/json",
            if_none_match=create and self.conditional,
            if_match=if_match if self.conditional else None,
        )

    async def acquire(self, ref: ObjectRef) -> Lease | Held | None:
        """A lease on `ref`; Held when another live replica has it; None when a race with
        another replica was lost (the next poll tries again)."""
        key = self.names.lease(ref.key)
        if self.conditional:
            try:
                etag = await self.write(ref, self.record(ref, 0, [], False), create=True)
                return Lease(self, ref, etag, 0, [])
            except PreconditionFailed:
                pass
        current = await self.storage.get_bytes(key)
        if current is None:
            if not self.conditional:
                etag = await self.write(ref, self.record(ref, 0, [], False))
                return Lease(self, ref, etag, 0, [])
            return None  # released between our two calls; the next poll tries again
        body, etag = current
        previous = LeaseRecord.parse(body)
        crashes, history = self._carried_over(ref, previous)
        if crashes is None:
            assert previous is not None
            log.info("claim_held_elsewhere", key=ref.key, owner=previous.owner,
                     expires_in=round(previous.expires_at - time.time(), 1))
            return Held(previous.owner, previous.expires_at)
        try:
            new_etag = await self.write(ref, self.record(ref, crashes, history, False), if_match=etag)
        except PreconditionFailed:
            return None
        if (previous is not None and previous.owner != self.settings.replica_id) or crashes:
            log.info("claim_taken_over", key=ref.key, previous_owner=previous and previous.owner,
                     crashes=crashes)
        return Lease(self, ref, new_etag, crashes, history)

    def _carried_over(
        self, ref: ObjectRef, previous: LeaseRecord | None
    ) -> tuple[int | None, list[str]]:
        """The crash count a new holder inherits, or None while the holder is alive."""
        if previous is None:
            return 0, []  # unreadable: treat as expired, nothing to inherit
        same_version = previous.source_etag == ref.etag
        crashes = previous.crashes if same_version else 0
        history = previous.history if same_version else []
        if previous.released:
            return crashes, history
        if previous.incarnation == INCARNATION and previous.owner == self.settings.replica_id:
            return crashes, history  # ours: a release that failed while S3 was away
        dead = holder_is_dead(previous, self.settings.replica_id)
        if not dead and previous.expires_at > time.time():
            return None, history
        if not same_version:
            return 0, []
        why = "died" if dead else "stopped renewing its lease (killed or cut off)"
        return crashes + 1, [*history, f"replica {previous.owner} {why} while processing"][-HISTORY_LIMIT:]


async def ignored_conditions(storage: Storage, prefix: str) -> list[str]:
    """Which of `If-None-Match: *` and `If-Match` the store ignores (some S3 services
    accept both and overwrite): leases rely on them; without them only shards are safe."""
    key = f"{prefix}.watcher-probe-{uuid.uuid4().hex}"
    ignored = []
    try:
        etag = await storage.put(key, b"first", "text/plain", if_none_match=True)
        try:
            await storage.put(key, b"second", "text/plain", if_none_match=True)
            ignored.append("If-None-Match")
        except PreconditionFailed:
            pass
        try:
            await storage.put(key, b"third", "text/plain", if_match=f"not-{etag}")
            ignored.append("If-Match")
        except PreconditionFailed:
            pass
    finally:
        await storage.delete(key)
    return ignored

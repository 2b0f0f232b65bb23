"""Discovery for a fleet: one replica lists the bucket, the others read what it found.

Listing is what costs at scale (Cloud.ru counts list requests per bucket), and N replicas
listing the same prefixes every poll multiply it by N. So the replicas agree on one
lister with a lease object, the same conditional-write mechanism as document claims
(`<lease prefix>_fleet/<deployment>/lister.lease`, where `<deployment>` names the input
and output prefixes; renewed while held, taken over when it expires or
when its holder is known dead). The lister runs Discovery and writes what is pending into
a small manifest object (`manifest.json` beside it, oldest first, at most
MANIFEST_LIMIT entries) only when that changed; the others fetch the manifest each poll
with a conditional GET (a 304 while unchanged) and only claim and work. Claims still
decide who does what, and a version's done-ness is checked again once its lease is held,
so a stale manifest costs a HEAD, never duplicate work. A follower does not offer again
what it finished itself since the manifest was written.

Stores without conditional writes (shard mode) and `WATCHER_SHARED_LISTING=false` keep
one listing per replica.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from enum import StrEnum
from typing import Any

from watcher.bucket.leases import Held, Lease, Leases
from watcher.bucket.names import Names
from watcher.bucket.storage import UNCHANGED, Storage, StorageUnavailable
from watcher.core.bounded import BoundedSet
from watcher.core.logs import get_logger
from watcher.core.outcome import FINISHED, Report
from watcher.core.refs import ObjectRef
from watcher.intake.discovery import Discovery

log = get_logger("watcher.intake.fleet")

MANIFEST_LIMIT = 10_000  # more than any replica queues between two polls
# Versions a follower finished since the manifest it read was written; more are forgotten.
FINISHED_REMEMBERED = 10_000


class Role(StrEnum):
    ALONE = "alone"  # lists for itself (shard mode, shared listing off, --once)
    LISTER = "lister"  # lists for the fleet
    FOLLOWER = "follower"  # reads the lister's manifest


def encode_manifest(lister: str, pending: list[ObjectRef]) -> bytes:
    rows = [[r.key, r.etag, r.size, r.last_modified.isoformat() if r.last_modified else None]
            for r in pending[:MANIFEST_LIMIT]]
    return json.dumps({"version": 1, "lister": lister, "pending_total": len(pending),
                       "pending": rows}, ensure_ascii=False, separators=(",", ":")).encode()


def decode_manifest(bucket: str, body: bytes) -> list[ObjectRef]:
    """The manifest's pending versions; an unreadable manifest reads as empty (the next
    write replaces it)."""
    try:
        data: Any = json.loads(body)
        return [ObjectRef(bucket=bucket, key=str(key), etag=str(etag), size=int(size),
                          last_modified=datetime.fromisoformat(modified) if modified else None)
                for key, etag, size, modified in data["pending"]]
    except (ValueError, KeyError, TypeError):
        log.warning("fleet_manifest_unreadable", bytes=len(body))
        return []


class FleetDiscovery:
    """`scan()` as Discovery has it, with the listing done once for the fleet."""

    def __init__(self, discovery: Discovery, leases: Leases, storage: Storage, names: Names,
                 shared: bool) -> None:
        self.discovery = discovery
        self.leases = leases
        self.storage = storage
        self.names = names
        self.replica = leases.settings.replica_id
        self.role = Role.FOLLOWER if shared else Role.ALONE
        self.lister: str | None = None if shared else self.replica
        self._lease: Lease | None = None
        self._held_until = 0.0
        self._written: bytes | None = None
        self._seen_etag: str | None = None
        self._seen: list[ObjectRef] = []
        # Versions this replica finished since the manifest was written: not offered again.
        self._finished: BoundedSet[tuple[str, str]] = BoundedSet(FINISHED_REMEMBERED)
        self._ref = ObjectRef(bucket=storage.bucket, key=names.lister_key, etag="fleet", size=0)

    async def scan(self) -> list[ObjectRef]:
        if self.role is Role.ALONE:
            return await self.discovery.scan()
        if await self._leading():
            todo = await self.discovery.scan()
            await self._share(todo)
            return todo
        return await self._follow()

    async def close(self) -> None:
        """Hand listing over at once (a drained replica is not a dead one)."""
        if self._lease is not None:
            await self._lease.finish()
            self._lease = None
        await self.leases.close()

    async def _leading(self) -> bool:
        if self._lease is not None and not self._lease.lost:
            return True
        if self._lease is not None:
            log.warning("fleet_lister_lease_lost")
            self._lease = None
        if time.time() < self._held_until:
            return False
        got = await self.leases.acquire(self._ref)
        if isinstance(got, Lease):
            self._lease, self.role, self.lister = got, Role.LISTER, self.replica
            self._written = None
            log.info("fleet_lister_taken", replica=self.replica)
            return True
        if isinstance(got, Held):
            # Ask again when its lease would run out; a living lister renews it by then.
            if got.owner != self.lister:
                log.info("fleet_following", lister=got.owner)
            self._held_until, self.lister = got.expires_at, got.owner
        self.role = Role.FOLLOWER
        return False

    async def _share(self, todo: list[ObjectRef]) -> None:
        body = encode_manifest(self.replica, todo)
        if body == self._written:
            return
        try:
            await self.storage.put(self.names.manifest, body, "application/json")
        except StorageUnavailable as exc:
            log.warning("fleet_manifest_not_written", error=str(exc))
            return
        self._written = body

    def ended(self, report: Report) -> None:
        """An outcome hook: a version with its result or error record (or not for us) is
        not offered again by a follower from a manifest written before that."""
        if self.role is Role.FOLLOWER and report.outcome in FINISHED:
            self._finished.add((report.ref.key, report.ref.etag))

    async def _follow(self) -> list[ObjectRef]:
        got = await self.storage.get_if_changed(self.names.manifest, self._seen_etag)
        if got is None:  # no lister has written one yet
            self._seen_etag, self._seen = None, []
        elif got is not UNCHANGED:
            body, etag = got
            self._seen_etag, self._seen = etag, decode_manifest(self.storage.bucket, body)
            listed = {(r.key, r.etag) for r in self._seen}
            self._finished.keep_only(listed)  # the rest the lister's listing knows about itself
        return [r for r in self._seen if (r.key, r.etag) not in self._finished]

    def snapshot(self) -> dict[str, Any]:
        return {"role": self.role.value, "lister": self.lister}

"""Claim: skip finished versions and take a lease so that replicas never share work.

A lease is a small JSON object written with `If-None-Match: *`; taking over an expired
one uses `If-Match` on the lease's ETag, so exactly one replica wins any race. A holder
renews it while it works, and deletes it when done. In `shard` mode (for stores without
conditional writes) discovery already filtered keys by hash and no lease is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from watcher.layout import SOURCE_ETAG_META, Layout
from watcher.logs import get_logger
from watcher.settings import ClaimMode, Settings
from watcher.storage import ObjectRef, PreconditionFailed, Storage, StorageUnavailable, clean_etag

log = get_logger("watcher.claim")


class Lease:
    """A held claim on one source version; `lost` turns true if another replica took it."""

    def __init__(self, claims: Claims, ref: ObjectRef, key: str | None, etag: str | None) -> None:
        self.claims = claims
        self.ref = ref
        self.key = key
        self.etag = etag
        self.lost = False
        self._renewer: asyncio.Task[None] | None = None
        if key is not None:
            self._renewer = asyncio.create_task(self._renew_forever(), name=f"lease:{ref.key}")

    async def _renew_forever(self) -> None:
        interval = self.claims.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                self.etag = await self.claims.write_lease(self.ref, if_match=self.etag)
            except PreconditionFailed:
                self.lost = True
                log.warning("lease_lost", key=self.ref.key)
                return
            except StorageUnavailable as exc:
                # Keep trying; the lease only expires after lease_seconds.
                log.warning("lease_renew_failed", key=self.ref.key, error=str(exc))

    async def release(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self.key is not None and not self.lost:
            try:
                await self.claims.storage.delete(self.key)
            except StorageUnavailable as exc:
                log.warning("lease_release_failed", key=self.ref.key, error=str(exc))


class Claims:
    def __init__(self, storage: Storage, settings: Settings, layout: Layout) -> None:
        self.storage = storage
        self.settings = settings
        self.layout = layout

    async def is_done(self, ref: ObjectRef) -> bool:
        """True when a result or error record already carries this source ETag."""
        for key in (self.layout.result_json(ref.key), self.layout.error_json(ref.key)):
            head = await self.storage.head(key)
            if head and clean_etag(head.get("Metadata", {}).get(SOURCE_ETAG_META, "")) == ref.etag:
                return True
        return False

    def _lease_body(self, ref: ObjectRef) -> bytes:
        return json.dumps({
            "owner": self.settings.replica_id,
            "source_key": ref.key,
            "source_etag": ref.etag,
            "expires_at": time.time() + self.settings.lease_seconds,
        }).encode()

    async def write_lease(
        self, ref: ObjectRef, if_match: str | None = None, create: bool = False
    ) -> str:
        return await self.storage.put(
            self.layout.lease(ref.key), self._lease_body(ref), "application/json",
            if_none_match=create, if_match=if_match,
        )

    async def acquire(self, ref: ObjectRef) -> Lease | None:
        """A lease on `ref`, or None when another live replica holds it."""
        if self.settings.claim_mode is ClaimMode.SHARD:
            return Lease(self, ref, None, None)
        key = self.layout.lease(ref.key)
        try:
            return Lease(self, ref, key, await self.write_lease(ref, create=True))
        except PreconditionFailed:
            pass
        current = await self.storage.get_bytes(key)
        if current is None:
            return None  # released between our two calls; the next poll tries again
        body, etag = current
        try:
            expires_at = float(json.loads(body)["expires_at"])
            owner = json.loads(body).get("owner")
        except (ValueError, KeyError, TypeError):
            expires_at, owner = 0.0, None  # unreadable lease: treat as expired
        if expires_at > time.time():
            log.info("claim_held_elsewhere", key=ref.key, owner=owner)
            return None
        try:
            new_etag = await self.write_lease(ref, if_match=etag)
        except PreconditionFailed:
            return None
        log.info("claim_taken_over", key=ref.key, previous_owner=owner)
        return Lease(self, ref, key, new_etag)

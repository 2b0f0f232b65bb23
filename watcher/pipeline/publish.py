"""Publish: a version's result (Markdown, then JSON) or error record, then its done-marker.

A commit is fenced and version-checked, so that the object in the output prefix is the
reading of the newest version whatever the network, the producers and the pods did:

1. the lease is renewed with `If-Match` (the fence): a holder that was cut off long
   enough for another replica to take the document over stops here;
2. the source's current ETag must still be the version's (a HEAD): a version replaced or
   deleted meanwhile publishes nothing (`Superseded`), its successor will;
3. the objects to write and remove are written and removed conditionally on the ETags
   read just before (If-Match / If-None-Match, If-Match on DELETE), so a concurrent
   commit is noticed, and the commit is then looked at again from step 1;
4. the lease is renewed again, and the done-marker written last.

Markdown goes before JSON: consumers wait for the JSON and then read both. A commit cut
off before its marker is finished by the next holder, which finds the JSON carrying the
version's ETag (bucket/done.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from watcher.bucket.done import DoneMarkers
from watcher.bucket.leases import Lease, LeaseLost
from watcher.bucket.names import ASSETS_META, SOURCE_ETAG_META, SOURCE_SHA256_META, Names
from watcher.bucket.storage import PreconditionFailed, Storage
from watcher.core.refs import ObjectRef, clean_etag
from watcher.pipeline.outputs import JSON, Output, build_outputs
from watcher.pipeline.result import now, source_fields, to_json_bytes

MARKDOWN = "text/markdown; charset=utf-8"
PNG = "image/png"
# Commits that found the output changed under them before giving up (for now).
COMMIT_TRIES = 3


class Superseded(Exception):
    """The source is no longer the version being published: replaced or deleted."""


@dataclass(frozen=True)
class _Write:
    key: str
    body: bytes
    content_type: str
    meta: tuple[tuple[str, str], ...] = ()


def _meta(ref: ObjectRef, write: _Write) -> dict[str, str]:
    meta = {SOURCE_ETAG_META: ref.etag, **dict(write.meta)}
    if ref.sha256:
        meta[SOURCE_SHA256_META] = ref.sha256
    return meta


class Publisher:
    def __init__(self, storage: Storage, names: Names, done: DoneMarkers,
                 outputs: tuple[Output, ...] = ()) -> None:
        self.storage = storage
        self.names = names
        self.done = done
        # Chunks and other formats are written with each result and removed with it. One not
        # asked for is not looked for (no request per document for a feature not used), so
        # files written while it was on stay until their result is replaced with it on.
        self.outputs = outputs

    async def result(self, ref: ObjectRef, lease: Lease | None, result_json: bytes,
                     markdown: bytes, extras: dict[str, bytes] | None = None,
                     assets: dict[str, bytes] | None = None) -> None:
        # Everything else is written before the JSON: once the JSON is there, all of it is.
        folder = self.names.result_assets(ref.key)
        assets = assets or {}
        writes = [_Write(f"{folder}{name}", png, PNG) for name, png in sorted(assets.items())]
        writes.append(_Write(self.names.result_markdown(ref.key), markdown, MARKDOWN))
        for output in self.outputs:
            if extras and output.suffix in extras:
                writes.append(_Write(self.names.result_extra(ref.key, output.suffix),
                                     extras[output.suffix], output.content_type))
        writes.append(_Write(self.names.result_json(ref.key), result_json, JSON,
                             ((ASSETS_META, str(len(assets))),) if assets else ()))
        # An earlier version's failure no longer describes this source (nor do its figures
        # that this version does not have: _commit).
        await self._commit(ref, lease, writes, [self.names.error_json(ref.key)])

    async def error(self, ref: ObjectRef, lease: Lease | None, record: dict[str, Any]) -> None:
        removes = [self.names.result_json(ref.key), self.names.result_markdown(ref.key)]
        removes += [self.names.result_extra(ref.key, output.suffix) for output in self.outputs]
        if self.names.shadowed_by(ref.key) is not None and record["error"]["code"] == "name_collision":
            removes = []  # its result name belongs to the other source's error record: leave it
        await self._commit(ref, lease, [
            _Write(self.names.error_json(ref.key), to_json_bytes(record), JSON),
        ], removes, error=True)

    async def _stale_assets(self, ref: ObjectRef, heads: dict[str, dict[str, Any] | None],
                            writes: list[_Write]) -> dict[str, dict[str, Any] | None]:
        """The figures of the result this commit replaces or removes that it does not write
        again, with their heads: listed only when that result's JSON (already looked at by
        the commit) says it has some, so that documents without figures cost nothing."""
        head = heads.get(self.names.result_json(ref.key))
        if not head or not head.get("Metadata", {}).get(ASSETS_META):
            return {}
        written = {w.key for w in writes}
        return {item.key: await self.storage.head(item.key)
                async for item in self.storage.list_objects(self.names.result_assets(ref.key))
                if item.key not in written}

    async def repoint(self, ref: ObjectRef, lease: Lease, engine: dict[str, str]) -> str | None:
        """When the existing result was made from the same content (an upload of the same
        bytes again, a multipart copy with an `-N` ETag) by the same engine and model, point
        it at this version instead of reading the document again. Returns the ETag it was
        made for, or None."""
        head = await self.storage.head(self.names.result_json(ref.key))
        meta = head.get("Metadata", {}) if head else {}
        if not ref.sha256 or meta.get(SOURCE_SHA256_META) != ref.sha256:
            return None
        if meta.get(ASSETS_META):
            return None  # its figures were cropped from the pages: read them again
        found = await self.storage.get_bytes(self.names.result_json(ref.key))
        markdown = await self.storage.get_bytes(self.names.result_markdown(ref.key))
        if found is None or markdown is None:
            return None
        result = json.loads(found[0])
        if result.get("engine") != engine:
            return None  # another engine or model now: the owner may want the new reading
        previous = clean_etag(meta.get(SOURCE_ETAG_META, ""))
        result["source"] = source_fields(ref)
        result["reused"] = {"from_etag": previous, "at": now()}
        await self.result(ref, lease, to_json_bytes(result), markdown[0],
                          build_outputs(self.outputs, result))
        return previous

    async def _commit(self, ref: ObjectRef, lease: Lease | None, writes: list[_Write],
                      removes: list[str], error: bool = False) -> None:
        for _ in range(COMMIT_TRIES):
            if lease is not None:
                await lease.fence()
            current = await self.storage.etag_of(ref.key)
            if current != ref.etag:
                raise Superseded(ref.key)
            heads = {key: await self.storage.head(key) for key in [*(w.key for w in writes), *removes]}
            stale = await self._stale_assets(ref, heads, writes)
            heads.update(stale)
            seen = {key: clean_etag(head["ETag"]) if head else None for key, head in heads.items()}
            try:
                for w in writes:
                    await self.storage.put(w.key, w.body, w.content_type, _meta(ref, w),
                                           if_none_match=seen[w.key] is None, if_match=seen[w.key])
                for key in [*removes, *stale]:
                    if seen[key] is not None:
                        await self.storage.delete(key, if_match=seen[key])
            except PreconditionFailed:
                continue  # another commit of this key ran meanwhile: look again
            if lease is not None:
                await lease.fence()
            await self.done.mark(ref, error)
            await self._unmark_replaced(ref, heads)
            return
        raise LeaseLost(f"{ref.key}: its results kept changing under this commit")

    async def _unmark_replaced(self, ref: ObjectRef, heads: dict[str, dict[str, Any] | None]) -> None:
        """The versions whose answers this commit replaced are not done any more: the same
        bytes uploaded again later (the same ETag) must be read again, not skipped."""
        replaced = {clean_etag(head.get("Metadata", {}).get(SOURCE_ETAG_META, ""))
                    for head in heads.values() if head}
        for etag in replaced - {"", ref.etag}:
            for error in (False, True):
                await self.storage.delete(self.names.marker(ref.key, etag, error))

"""Checkpoints: a long document's recognised pages, kept in S3 until its result is out.

A drain cut short, an S3 outage or a crash used to throw away every page of a long
document already recognised (a 150-page PDF interrupted at page 10 started again from
page 1). Each page of a document of CHECKPOINT_MIN_PAGES or more is saved as it comes
back from the engine, under the internal prefix and tied to the source ETag:

    <lease prefix>_pages/<sha256 of the source key>/<source etag>/<page index>.json

The next attempt, on any replica, loads them and recognises only the rest; they are
deleted once the result or the error record is published. Saving is best effort: a page
whose checkpoint could not be written is simply recognised again next time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import asdict
from typing import Any

from watcher.bucket.names import Names
from watcher.bucket.storage import KeyRefused, Storage, StorageUnavailable
from watcher.core.logs import get_logger
from watcher.core.pages import Block, PageResult
from watcher.core.refs import ObjectRef

log = get_logger("watcher.pipeline.checkpoint")

# Shorter documents cost little to redo (at most a few pages beyond those in flight), and
# a PUT per page would cost them more than it saves.
CHECKPOINT_MIN_PAGES = 8


def page_to_json(page: PageResult) -> bytes:
    return json.dumps(asdict(page), ensure_ascii=False).encode("utf-8")


def page_from_json(body: bytes) -> PageResult:
    data: dict[str, Any] = json.loads(body)
    data["blocks"] = [Block(**block) for block in data["blocks"]]
    return PageResult(**data)


class Checkpoints:
    def __init__(self, storage: Storage, names: Names) -> None:
        self.storage = storage
        self.names = names

    def _document_prefix(self, ref: ObjectRef) -> str:
        digest = hashlib.sha256(ref.key.encode("utf-8")).hexdigest()
        return f"{self.names.lease_prefix}_pages/{digest}/"

    def _version_prefix(self, ref: ObjectRef) -> str:
        return f"{self._document_prefix(ref)}{ref.etag}/"

    @staticmethod
    def wanted(page_count: int) -> bool:
        return page_count >= CHECKPOINT_MIN_PAGES

    async def load(self, ref: ObjectRef, page_count: int, always: bool = False) -> dict[int, PageResult]:
        """Pages of this source version recognised by an earlier attempt (`always`: a
        suspect's, whose pages are kept however few; pipeline/isolation.py)."""
        if not (always or self.wanted(page_count)):
            return {}
        keys = [obj.key async for obj in self.storage.list_objects(self._version_prefix(ref))]
        # Hundreds of pages may be kept; the S3 client's connection pool bounds these GETs.
        bodies = await asyncio.gather(*(self.storage.get_bytes(key) for key in keys))
        pages: dict[int, PageResult] = {}
        for found in bodies:
            if found is None:
                continue
            try:
                page = page_from_json(found[0])
            except (ValueError, TypeError, KeyError):
                continue  # unreadable: the page is recognised again
            if 0 <= page.index < page_count:
                pages[page.index] = page
        if pages:
            log.info("document_resumed", pages_kept=len(pages), pages=page_count)
        return pages

    async def save(self, ref: ObjectRef, page: PageResult) -> None:
        key = f"{self._version_prefix(ref)}{page.index:06d}.json"
        try:
            body = await asyncio.to_thread(page_to_json, page)
            await self.storage.put(key, body, "application/json")
        except (StorageUnavailable, KeyRefused) as exc:
            log.warning("checkpoint_not_saved", page=page.index, error=str(exc))

    async def clear(self, ref: ObjectRef) -> None:
        """Remove every checkpoint of this source (all versions): best effort."""
        try:
            keys = [obj.key async for obj in self.storage.list_objects(self._document_prefix(ref))]
            for key in keys:
                await self.storage.delete(key)
        except StorageUnavailable as exc:
            log.warning("checkpoints_not_cleared", error=str(exc))

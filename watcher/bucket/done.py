"""Done-ness: which source versions have their result or error record, read from S3 alone.

Publishing a result or an error record writes an empty done-marker
`<lease prefix>_done/<sha256 of the source key>/<source etag>` after it, so discovery
knows what is done from a listing, with no request per document. Results also carry the
source ETag in their metadata (`x-amz-meta-source-etag`): a result whose publisher was
cut off before its marker, or one from before markers existed, is recognised by that and
marked on first sight.
"""

from __future__ import annotations

from enum import StrEnum

from watcher.bucket.names import SOURCE_ETAG_META, Names
from watcher.bucket.storage import Storage
from watcher.core.refs import ObjectRef, clean_etag


class Done(StrEnum):
    """How a version is known to be done."""

    MARKED = "marked"  # its result's done-marker exists
    ERROR_MARKED = "error_marked"  # its error record's done-marker exists
    RESULT = "result"  # its result exists, unmarked: its publisher stopped before the end
    ERROR_RECORD = "error_record"  # its error record exists, unmarked


HAS_RESULT = frozenset({Done.MARKED, Done.RESULT})


class DoneMarkers:
    def __init__(self, storage: Storage, names: Names) -> None:
        self.storage = storage
        self.names = names

    async def mark(self, ref: ObjectRef, error: bool = False) -> None:
        """The done-marker of this version, written after its result (or error record); those
        of the source's earlier versions are removed by discovery, which lists them anyway."""
        await self.storage.put(self.names.marker(ref.key, ref.etag, error), b"", "application/octet-stream")

    async def marked(self, ref: ObjectRef) -> Done | None:
        """This version's done-marker, if any (a HEAD or two): the quick check before claiming."""
        if await self.storage.head(self.names.marker(ref.key, ref.etag)) is not None:
            return Done.MARKED
        if await self.storage.head(self.names.marker(ref.key, ref.etag, error=True)) is not None:
            return Done.ERROR_MARKED
        return None

    async def published(self, ref: ObjectRef) -> Done | None:
        """A result or error record that carries this ETag, with or without a marker (its
        publisher was cut off before the marker, or it dates from before markers): the check
        made once the lease is held, when nobody else can publish it. Unmarked ones get
        their marker now, so that listings know them next time."""
        for key, kind in ((self.names.result_json(ref.key), Done.RESULT),
                          (self.names.error_json(ref.key), Done.ERROR_RECORD)):
            head = await self.storage.head(key)
            if head and clean_etag(head.get("Metadata", {}).get(SOURCE_ETAG_META, "")) == ref.etag:
                error = kind is Done.ERROR_RECORD
                if await self.storage.head(self.names.marker(ref.key, ref.etag, error)) is not None:
                    # Published and marked a moment ago, by a replica that got there first.
                    return Done.ERROR_MARKED if error else Done.MARKED
                await self.mark(ref, error=error)
                return kind
        return None

    async def has_result(self, ref: ObjectRef) -> bool:
        """This version's result is the one in the output prefix (one HEAD)."""
        head = await self.storage.head(self.names.result_json(ref.key))
        return head is not None and clean_etag(head.get("Metadata", {}).get(SOURCE_ETAG_META, "")) == ref.etag

    async def remark_as_error(self, ref: ObjectRef) -> None:
        """A marker from before markers had kinds, for a version that has an error record."""
        await self.mark(ref, error=True)
        await self.storage.delete(self.names.marker(ref.key, ref.etag))

    async def check(self, ref: ObjectRef) -> Done | None:
        """Whether this version is done, and how we know."""
        return await self.marked(ref) or await self.published(ref)

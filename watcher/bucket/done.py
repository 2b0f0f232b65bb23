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
from watcher.bucket.storage import ObjectRef, Storage, clean_etag


class Done(StrEnum):
    """How a version is known to be done."""

    MARKED = "marked"  # its done-marker exists
    RESULT = "result"  # its result exists, unmarked: its publisher stopped before the end
    ERROR_RECORD = "error_record"  # its error record exists, unmarked


class DoneMarkers:
    def __init__(self, storage: Storage, names: Names) -> None:
        self.storage = storage
        self.names = names

    async def mark(self, ref: ObjectRef) -> None:
        """The done-marker of this version, written after its result (or error record); those
        of the source's earlier versions are removed by discovery, which lists them anyway."""
        await self.storage.put(self.names.marker(ref.key, ref.etag), b"", "application/octet-stream")

    async def is_marked(self, ref: ObjectRef) -> bool:
        """This version's done-marker exists (one HEAD): the quick check before claiming."""
        return await self.storage.head(self.names.marker(ref.key, ref.etag)) is not None

    async def check(self, ref: ObjectRef) -> Done | None:
        """Whether this version is done, and how we know; the check made once its lease is
        held, when nobody else can publish it.

        A result or error record that carries this ETag without a marker (its publisher
        was cut off before the marker, or it dates from before markers) gets its marker
        now, so that listings know it next time."""
        if await self.is_marked(ref):
            return Done.MARKED
        for key, kind in ((self.names.result_json(ref.key), Done.RESULT),
                          (self.names.error_json(ref.key), Done.ERROR_RECORD)):
            head = await self.storage.head(key)
            if head and clean_etag(head.get("Metadata", {}).get(SOURCE_ETAG_META, "")) == ref.etag:
                await self.mark(ref)
                return kind
        return None

"""Discovery: list the input prefix and yield the source versions that are not done.

With WATCHER_RESULTS_OF_DELETED_SOURCES=delete it also removes the results whose source
is gone: seen missing on two listings in a row, so that one odd listing removes nothing.

Done-ness lives in S3 and is read from listings: publishing a result or an error record
writes an empty done-marker `<lease prefix>_done/<sha256 of the source key>/<source etag>`,
so a restart over a hundred thousand finished documents lists and starts, with no request
per document. Results from before markers existed (a version is done when
`<output>/<rel>.json` or `.error.json` carries its ETag in metadata) are checked with a
HEAD once, cached by the result's own ETag, and get their marker then.
"""

from __future__ import annotations

import asyncio

from watcher.layout import SOURCE_ETAG_META, Layout, shard_of
from watcher.logs import get_logger
from watcher.settings import ClaimMode, DeletedSourceResults, Settings
from watcher.storage import ObjectRef, Storage, clean_etag

log = get_logger("watcher.discovery")

# Items handled between two yields to the event loop.
BATCH = 500


class Discovery:
    def __init__(self, storage: Storage, settings: Settings, layout: Layout) -> None:
        self.storage = storage
        self.settings = settings
        self.layout = layout
        self._recorded: dict[tuple[str, str], str] = {}  # (result key, result etag) -> source etag
        self._head_limit = asyncio.Semaphore(16)
        self._prune = settings.results_of_deleted_sources is DeletedSourceResults.DELETE
        self._orphans: set[str] = set()  # results whose source the last listing lacked

    def _mine(self, key: str) -> bool:
        if self.settings.claim_mode is not ClaimMode.SHARD:
            return True
        return shard_of(key, self.settings.shard_count) == self.settings.shard_index

    async def _recorded_etag(self, result: ObjectRef) -> str | None:
        cache_key = (result.key, result.etag)
        if cache_key not in self._recorded:
            async with self._head_limit:
                head = await self.storage.head(result.key)
            if head is None:
                return None
            self._recorded[cache_key] = clean_etag(head.get("Metadata", {}).get(SOURCE_ETAG_META, ""))
        return self._recorded[cache_key]

    async def _is_done(self, ref: ObjectRef, results: list[ObjectRef]) -> bool:
        for result in results:
            if await self._recorded_etag(result) == ref.etag:
                return True
        return False

    async def scan(self) -> list[ObjectRef]:
        """Source versions under the input prefix with no result for their ETag, oldest first.

        The event loop also answers /health: with a backlog of many thousands, the work
        is done in batches that yield, and only sources that have a result object at
        all cost a coroutine (a HEAD at most once per result version).
        """
        marked = await self._marked()
        outputs: dict[str, ObjectRef] = {}
        async for ref in self.storage.list_objects(self.layout.output_prefix):
            outputs[ref.key] = ref
        todo: list[ObjectRef] = []
        to_check: list[tuple[ObjectRef, list[ObjectRef]]] = []
        sources: set[str] = set()
        seen = 0
        async for ref in self.storage.list_objects(self.layout.input_prefix):
            seen += 1
            if seen % BATCH == 0:
                await asyncio.sleep(0)
            if self._prune:
                sources.add(ref.key)
            if not (self.layout.is_document_key(ref.key) and self._mine(ref.key)):
                continue
            if self.layout.marker(ref.key, ref.etag) in marked:
                continue
            results = [outputs[k] for k in (self.layout.result_json(ref.key),
                                            self.layout.error_json(ref.key)) if k in outputs]
            if results:
                to_check.append((ref, results))
            else:
                todo.append(ref)
        for start in range(0, len(to_check), BATCH):
            chunk = to_check[start:start + BATCH]
            done = await asyncio.gather(*(self._is_done(ref, results) for ref, results in chunk))
            todo.extend(ref for (ref, _), is_done in zip(chunk, done, strict=True) if not is_done)
            await self._mark_legacy([ref for (ref, _), is_done in zip(chunk, done, strict=True) if is_done])
        self._recorded = {k: v for k, v in self._recorded.items() if k[0] in outputs}
        if self._prune:
            await self._remove_orphans(outputs, sources)
        todo.sort(key=lambda r: (r.last_modified is None, r.last_modified, r.key))
        return todo

    async def _marked(self) -> set[str]:
        keys: set[str] = set()
        async for ref in self.storage.list_objects(self.layout.markers_prefix):
            keys.add(ref.key)
            if len(keys) % BATCH == 0:
                await asyncio.sleep(0)
        return keys

    async def _mark_legacy(self, done: list[ObjectRef]) -> None:
        """Results from before done-markers: mark them, so the next listing knows."""
        async def one(ref: ObjectRef) -> None:
            async with self._head_limit:
                await self.storage.put(self.layout.marker(ref.key, ref.etag), b"",
                                       "application/octet-stream")

        await asyncio.gather(*(one(ref) for ref in done))

    async def _remove_orphans(self, outputs: dict[str, ObjectRef], sources: set[str]) -> None:
        orphans = set()
        for key in outputs:
            candidates = self.layout.sources_of(key)
            if (candidates and self._mine(candidates[0])
                    and not any(source in sources for source in candidates)):
                orphans.add(key)
        confirmed, self._orphans = orphans & self._orphans, orphans - self._orphans
        for key in sorted(confirmed):
            await self.storage.delete(key)
            log.info("result_removed_source_deleted", result=key)
            for source in self.layout.sources_of(key):
                async for marker in self.storage.list_objects(self.layout.marker_dir(source)):
                    await self.storage.delete(marker.key)

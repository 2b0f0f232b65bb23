"""Discovery: list the input prefix and yield the source versions that are not done.

With WATCHER_RESULTS_OF_DELETED_SOURCES=delete it also removes the results whose source
is gone: seen missing on two listings in a row, so that one odd listing removes nothing.

Done-ness lives in S3 and is read from listings: publishing a result or an error record
writes an empty done-marker `<lease prefix>_done/<sha256 of the source key>/<source etag>`,
so a restart over a hundred thousand finished documents lists and starts, with no request
per document, and the output prefix is not listed at all (only with pruning on). A result
from before markers existed looks undone here; the claim stage finds it (a HEAD of the
result, which carries the source ETag in metadata), writes its marker and skips it, so an
old bucket migrates once, on first sight.

Under WATCHER_SOURCE_ACTION=move or delete a source still in the input prefix is offered
even when marked: its settling was cut off, and the claim stage finishes it. Markers
whose source is gone (settled, or deleted by its owner) are removed, so the markers
listed each poll stay as many as the sources.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from watcher.bucket.leases import LeaseRecord
from watcher.bucket.names import Names, shard_of
from watcher.bucket.storage import PreconditionFailed, Storage
from watcher.core.logs import get_logger
from watcher.core.refs import ObjectRef
from watcher.core.settings import ClaimMode, DeletedSourceResults, Settings, SourceAction

log = get_logger("watcher.intake.discovery")

# Items handled between two yields to the event loop.
BATCH = 500
# A lease not renewed for this many lease periods has no living holder.
STALE_LEASE_PERIODS = 3
# A marker is removed with its source only when written this long before the listing
# that missed the source, and a lease counts as written before this process started up
# to this long after it: S3's clock and ours may differ a little.
ORPHAN_MARKER_SLACK_SECONDS = 300.0


class Discovery:
    def __init__(self, storage: Storage, settings: Settings, names: Names,
                 clock: Callable[[], float] = time.time,
                 holder_is_dead: Callable[[LeaseRecord], bool] | None = None) -> None:
        self.storage = storage
        self.settings = settings
        self.names = names
        self.clock = clock
        # Leases.holder_is_dead: a holder known gone (this replica's earlier process).
        self.holder_is_dead = holder_is_dead
        self._started = clock()
        # Under `move` and `delete` a source still in the input prefix is not settled yet,
        # marked or not: it is offered, and the claim stage settles a marked one.
        self._settles = settings.source_action is not SourceAction.KEEP
        self._marker_times: dict[str, float] = {}  # marker key -> when it was written
        self._prune = settings.results_of_deleted_sources is DeletedSourceResults.DELETE
        self._orphans: set[str] = set()  # results whose source the last listing lacked
        # Versions the last scan found with an error record (`--once` names them).
        self.error_recorded: list[ObjectRef] = []

    def _mine(self, key: str) -> bool:
        if self.settings.claim_mode is not ClaimMode.SHARD:
            return True
        return shard_of(key, self.settings.shard_count) == self.settings.shard_index

    async def scan(self) -> list[ObjectRef]:
        """Source versions under the input prefix without a done-marker, oldest first.

        Two listings (markers and sources, side by side) and no request per object. A
        marker names its version's ETag, so listings taken at different moments can only
        err towards offering a finished version, which the claim stage then skips. The
        event loop also answers /health: with a backlog of many thousands, the work is
        done in batches that yield.
        """
        started = self.clock()
        markers = asyncio.create_task(self._marked())
        try:
            listed = await self._sources()
            marked = await markers
        finally:
            markers.cancel()
        todo: list[ObjectRef] = []
        stale: list[str] = []
        error_recorded: list[ObjectRef] = []
        for n, ref in enumerate(listed, 1):
            if n % BATCH == 0:
                await asyncio.sleep(0)
            if not (self.names.is_document_key(ref.key) and self._mine(ref.key)):
                continue
            folder, result_marker, error_marker = self.names.markers(ref.key, ref.etag)
            here = marked.get(folder, set())
            mine = {result_marker, error_marker}
            has_result = result_marker in here
            if not here & mine or (self._settles and has_result):
                todo.append(ref)
            if here & mine:
                stale.extend(here - mine)
            if error_marker in here:
                error_recorded.append(ref)
        self.error_recorded = error_recorded
        stale.extend(self._orphan_markers(listed, marked, started))
        await self._remove_stale_markers(stale)
        await self._sweep_leases(listed, marked, started)
        if self._prune:
            await self._remove_orphans({ref.key for ref in listed})
        todo.sort(key=lambda r: (r.last_modified is None, r.last_modified, r.key))
        return todo

    def _markers_of(self, key: str, etag: str) -> set[str]:
        """The keys a marker of this version may have (result, error record)."""
        return set(self.names.markers(key, etag)[1:])

    def _done(self, key: str, etag: str, marked: dict[str, set[str]]) -> bool:
        return bool(self._markers_of(key, etag) & marked.get(self.names.marker_dir(key), set()))

    async def _sources(self) -> list[ObjectRef]:
        listed: list[ObjectRef] = []
        async for ref in self.storage.list_objects(self.names.input_prefix):
            listed.append(ref)
            if len(listed) % BATCH == 0:
                await asyncio.sleep(0)
        return listed

    async def _marked(self) -> dict[str, set[str]]:
        """Marker directory (one per source key) -> the markers in it (their full keys)."""
        marked: dict[str, set[str]] = {}
        self._marker_times = {}
        seen = 0
        async for ref in self.storage.list_objects(self.names.markers_prefix):
            directory, _, _name = ref.key.rpartition("/")
            marked.setdefault(f"{directory}/", set()).add(ref.key)
            if ref.last_modified is not None:
                self._marker_times[ref.key] = ref.last_modified.timestamp()
            seen += 1
            if seen % BATCH == 0:
                await asyncio.sleep(0)
        return marked

    def _orphan_markers(self, listed: list[ObjectRef], marked: dict[str, set[str]],
                        started: float) -> list[str]:
        """Markers of sources that are gone (moved or deleted after their result): written
        well before this listing began, which did not find their source. A source back
        again after that is not marked, so it is read again (or re-pointed, when its
        content was read before)."""
        present = {self.names.marker_dir(ref.key) for ref in listed}
        cutoff = started - ORPHAN_MARKER_SLACK_SECONDS
        orphans: list[str] = []
        for directory, markers in marked.items():
            if directory in present:
                continue
            orphans.extend(key for key in markers if self._marker_times.get(key, started) < cutoff)
        return orphans

    async def _sweep_leases(self, listed: list[ObjectRef], marked: dict[str, set[str]],
                            started: float) -> None:
        """Delete leases that nobody has renewed for several lease periods and whose
        version is done (or whose source is gone): a replica killed between publishing and
        letting go leaves one, and nobody else would ever look at it again. One whose
        holder is known dead (this replica's process before a restart) goes at once.
        Released leases of versions not done yet keep their attempt counts."""
        # Written before the listing began: their version is the one listed, or older.
        cutoff = started - STALE_LEASE_PERIODS * self.settings.lease_seconds
        current = {ref.key: ref.etag for ref in listed}
        stale = []
        async for lease in self.storage.list_objects(self.names.source_leases_prefix):
            key = self.names.source_of_lease(lease.key)
            if key is None or lease.last_modified is None:
                continue
            etag = current.get(key)
            if etag is not None and not self._done(key, etag, marked):
                continue
            written = lease.last_modified.timestamp()
            if written <= cutoff or await self._left_by_the_dead(lease.key, written):
                stale.append(lease)
        for lease in stale:
            try:
                # Only the lease as listed: one taken meanwhile is another holder's.
                await self.storage.delete(lease.key, if_match=lease.etag)
            except PreconditionFailed:
                continue
            log.info("stale_lease_removed", lease=lease.key)

    async def _left_by_the_dead(self, key: str, written: float) -> bool:
        """A lease of a done version whose holder is known dead: one GET, only for leases
        written before this process started (a dead predecessor's, give or take the
        clocks), so that the released records of finished work are not read every poll."""
        if self.holder_is_dead is None or written > self._started + ORPHAN_MARKER_SLACK_SECONDS:
            return False
        found = await self.storage.get_bytes(key)
        record = LeaseRecord.parse(found[0]) if found else None
        return record is not None and not record.released and self.holder_is_dead(record)

    async def _remove_stale_markers(self, stale: list[str]) -> None:
        """Markers of versions replaced since, once the current version is marked too."""
        for start in range(0, len(stale), BATCH):
            await asyncio.gather(*(self.storage.delete(key) for key in stale[start:start + BATCH]))

    async def _remove_orphans(self, sources: set[str]) -> None:
        orphans = set()
        async for result in self.storage.list_objects(self.names.output_prefix):
            key = result.key
            candidates = self.names.sources_of(key)
            if (candidates and self._mine(candidates[0])
                    and not any(source in sources for source in candidates)):
                orphans.add(key)
        confirmed, self._orphans = orphans & self._orphans, orphans - self._orphans
        for key in sorted(confirmed):
            await self.storage.delete(key)
            log.info("result_removed_source_deleted", result=key)
            for source in self.names.sources_of(key):
                async for marker in self.storage.list_objects(self.names.marker_dir(source)):
                    await self.storage.delete(marker.key)

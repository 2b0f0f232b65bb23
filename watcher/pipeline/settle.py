"""Settle: after the commit, keep, delete or move the source as configured.

Only the version that has its result is ever touched: `move` copies with
`CopySourceIfMatch` on its ETag and deletes with `If-Match` on it, `delete` deletes with
`If-Match` (stores that ignore these conditions get a HEAD and a compare first; see
`Conditions`). A newer version uploaded meanwhile is left where it is and processed in
its turn. Settling is idempotent: a source found marked done but still in the input
prefix (its settler was cut off) is settled by whoever sees it next (pipeline/claim.py).
"""

from __future__ import annotations

from enum import StrEnum

from watcher.bucket.names import Names
from watcher.bucket.storage import PreconditionFailed, Storage
from watcher.core.logs import get_logger
from watcher.core.refs import ObjectRef
from watcher.core.settings import SourceAction

log = get_logger("watcher.pipeline.settle")


class Settled(StrEnum):
    KEPT = "kept"
    MOVED = "moved"
    DELETED = "deleted"
    GONE = "gone"  # the source was already moved or deleted
    NEWER = "newer"  # a newer version is there: left for its own turn


async def settle(storage: Storage, names: Names, ref: ObjectRef, action: SourceAction) -> Settled:
    if action is SourceAction.KEEP:
        return Settled.KEPT
    try:
        if action is SourceAction.MOVE:
            try:
                await storage.copy(ref.key, names.done(ref.key), if_match=ref.etag)
            except FileNotFoundError:
                return Settled.GONE
        deleted = await storage.delete(ref.key, if_match=ref.etag)
    except PreconditionFailed:
        log.info("source_not_settled_newer_version", action=action.value)
        return Settled.NEWER
    if not deleted:
        return Settled.GONE
    return Settled.MOVED if action is SourceAction.MOVE else Settled.DELETED

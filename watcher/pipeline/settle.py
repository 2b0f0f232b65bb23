"""Settle: after the commit, keep, delete or move the source as configured."""

from __future__ import annotations

from watcher.bucket.names import Names
from watcher.bucket.storage import ObjectRef, Storage
from watcher.core.settings import SourceAction


async def settle(storage: Storage, names: Names, ref: ObjectRef, action: SourceAction) -> None:
    if action is SourceAction.MOVE:
        await storage.copy(ref.key, names.done(ref.key))
        await storage.delete(ref.key)
    elif action is SourceAction.DELETE:
        await storage.delete(ref.key)

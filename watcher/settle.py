"""Settle: after the commit, keep, delete or move the source as configured."""

from __future__ import annotations

from watcher.layout import Layout
from watcher.settings import SourceAction
from watcher.storage import ObjectRef, Storage


async def settle(storage: Storage, layout: Layout, ref: ObjectRef, action: SourceAction) -> None:
    if action is SourceAction.MOVE:
        await storage.copy(ref.key, layout.done(ref.key))
        await storage.delete(ref.key)
    elif action is SourceAction.DELETE:
        await storage.delete(ref.key)

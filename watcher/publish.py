"""Publish: Markdown first, JSON last; the JSON is the commit record of a version."""

from __future__ import annotations

from typing import Any

from watcher.layout import SOURCE_ETAG_META, Layout
from watcher.render import to_json_bytes
from watcher.storage import ObjectRef, Storage

JSON = "application/json; charset=utf-8"
MARKDOWN = "text/markdown; charset=utf-8"


def _meta(ref: ObjectRef) -> dict[str, str]:
    return {SOURCE_ETAG_META: ref.etag}


async def publish_result(
    storage: Storage, layout: Layout, ref: ObjectRef, result_json: bytes, markdown: bytes
) -> None:
    await storage.put(layout.result_markdown(ref.key), markdown, MARKDOWN, _meta(ref))
    await storage.put(layout.result_json(ref.key), result_json, JSON, _meta(ref))
    # An earlier version's failure no longer describes this source.
    await storage.delete(layout.error_json(ref.key))


async def publish_error(
    storage: Storage, layout: Layout, ref: ObjectRef, record: dict[str, Any]
) -> None:
    await storage.put(layout.error_json(ref.key), to_json_bytes(record), JSON, _meta(ref))
    if layout.shadowed_by(ref.key) is not None and record["error"]["code"] == "name_collision":
        return  # its result name belongs to the other source's error record: leave it
    # Results of an earlier version would contradict the error for the current one.
    await storage.delete(layout.result_json(ref.key))
    await storage.delete(layout.result_markdown(ref.key))

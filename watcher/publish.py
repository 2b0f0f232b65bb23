"""Publish: Markdown first, JSON last; the JSON is the commit record of a version."""

from __future__ import annotations

import json
from typing import Any

from watcher.layout import SOURCE_ETAG_META, SOURCE_SHA256_META, Layout
from watcher.render import now, source_fields, to_json_bytes
from watcher.storage import ObjectRef, Storage, clean_etag

JSON = "application/json; charset=utf-8"
MARKDOWN = "text/markdown; charset=utf-8"


async def mark_done(storage: Storage, layout: Layout, ref: ObjectRef) -> None:
    """The done-marker of this version, written after its result (or error record); those
    of the source's earlier versions are removed by discovery, which lists them anyway."""
    await storage.put(layout.marker(ref.key, ref.etag), b"", "application/octet-stream")


def _meta(ref: ObjectRef) -> dict[str, str]:
    meta = {SOURCE_ETAG_META: ref.etag}
    if ref.sha256:
        meta[SOURCE_SHA256_META] = ref.sha256
    return meta


async def publish_result(
    storage: Storage, layout: Layout, ref: ObjectRef, result_json: bytes, markdown: bytes
) -> None:
    await storage.put(layout.result_markdown(ref.key), markdown, MARKDOWN, _meta(ref))
    await storage.put(layout.result_json(ref.key), result_json, JSON, _meta(ref))
    # An earlier version's failure no longer describes this source.
    await storage.delete(layout.error_json(ref.key))
    await mark_done(storage, layout, ref)


async def publish_error(
    storage: Storage, layout: Layout, ref: ObjectRef, record: dict[str, Any]
) -> None:
    await storage.put(layout.error_json(ref.key), to_json_bytes(record), JSON, _meta(ref))
    await mark_done(storage, layout, ref)
    if layout.shadowed_by(ref.key) is not None and record["error"]["code"] == "name_collision":
        return  # its result name belongs to the other source's error record: leave it
    # Results of an earlier version would contradict the error for the current one.
    await storage.delete(layout.result_json(ref.key))
    await storage.delete(layout.result_markdown(ref.key))


async def repoint_result(
    storage: Storage, layout: Layout, ref: ObjectRef, engine: dict[str, str]
) -> str | None:
    """When the existing result was made from the same content (an upload of the same
    bytes again, a multipart copy with an `-N` ETag) by the same engine and model, point
    it at this version instead of reading the document again. Returns the ETag it was
    made for, or None."""
    head = await storage.head(layout.result_json(ref.key))
    meta = head.get("Metadata", {}) if head else {}
    if not ref.sha256 or meta.get(SOURCE_SHA256_META) != ref.sha256:
        return None
    found = await storage.get_bytes(layout.result_json(ref.key))
    markdown = await storage.get_bytes(layout.result_markdown(ref.key))
    if found is None or markdown is None:
        return None
    result = json.loads(found[0])
    if result.get("engine") != engine:
        return None  # another engine or model now: the owner may want the new reading
    previous = clean_etag(meta.get(SOURCE_ETAG_META, ""))
    result["source"] = source_fields(ref)
    result["reused"] = {"from_etag": previous, "at": now()}
    await storage.put(layout.result_markdown(ref.key), markdown[0], MARKDOWN, _meta(ref))
    await storage.put(layout.result_json(ref.key), to_json_bytes(result), JSON, _meta(ref))
    await storage.delete(layout.error_json(ref.key))
    await mark_done(storage, layout, ref)
    return previous

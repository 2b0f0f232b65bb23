"""Publish: Markdown first, JSON last; the JSON is the commit record of a version."""

from __future__ import annotations

import json
from typing import Any

from watcher.bucket.done import DoneMarkers
from watcher.bucket.names import SOURCE_ETAG_META, SOURCE_SHA256_META, Names
from watcher.bucket.storage import ObjectRef, Storage, clean_etag
from watcher.pipeline.result import now, source_fields, to_json_bytes

JSON = "application/json; charset=utf-8"
MARKDOWN = "text/markdown; charset=utf-8"


def _meta(ref: ObjectRef) -> dict[str, str]:
    meta = {SOURCE_ETAG_META: ref.etag}
    if ref.sha256:
        meta[SOURCE_SHA256_META] = ref.sha256
    return meta


async def publish_result(
    storage: Storage, names: Names, ref: ObjectRef, result_json: bytes, markdown: bytes
) -> None:
    await storage.put(names.result_markdown(ref.key), markdown, MARKDOWN, _meta(ref))
    await storage.put(names.result_json(ref.key), result_json, JSON, _meta(ref))
    # An earlier version's failure no longer describes this source.
    await storage.delete(names.error_json(ref.key))
    await DoneMarkers(storage, names).mark(ref)


async def publish_error(
    storage: Storage, names: Names, ref: ObjectRef, record: dict[str, Any]
) -> None:
    await storage.put(names.error_json(ref.key), to_json_bytes(record), JSON, _meta(ref))
    await DoneMarkers(storage, names).mark(ref)
    if names.shadowed_by(ref.key) is not None and record["error"]["code"] == "name_collision":
        return  # its result name belongs to the other source's error record: leave it
    # Results of an earlier version would contradict the error for the current one.
    await storage.delete(names.result_json(ref.key))
    await storage.delete(names.result_markdown(ref.key))


async def repoint_result(
    storage: Storage, names: Names, ref: ObjectRef, engine: dict[str, str]
) -> str | None:
    """When the existing result was made from the same content (an upload of the same
    bytes again, a multipart copy with an `-N` ETag) by the same engine and model, point
    it at this version instead of reading the document again. Returns the ETag it was
    made for, or None."""
    head = await storage.head(names.result_json(ref.key))
    meta = head.get("Metadata", {}) if head else {}
    if not ref.sha256 or meta.get(SOURCE_SHA256_META) != ref.sha256:
        return None
    found = await storage.get_bytes(names.result_json(ref.key))
    markdown = await storage.get_bytes(names.result_markdown(ref.key))
    if found is None or markdown is None:
        return None
    result = json.loads(found[0])
    if result.get("engine") != engine:
        return None  # another engine or model now: the owner may want the new reading
    previous = clean_etag(meta.get(SOURCE_ETAG_META, ""))
    result["source"] = source_fields(ref)
    result["reused"] = {"from_etag": previous, "at": now()}
    await storage.put(names.result_markdown(ref.key), markdown[0], MARKDOWN, _meta(ref))
    await storage.put(names.result_json(ref.key), to_json_bytes(result), JSON, _meta(ref))
    await storage.delete(names.error_json(ref.key))
    await DoneMarkers(storage, names).mark(ref)
    return previous

"""What happens to results when their source is deleted: kept by default, removed on request."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import daemon_running, make_settings, object_exists, wait_for_keys
from docgen import make_image
from waiting import eventually

from watcher.bucket.names import SOURCE_ETAG_META, Names
from watcher.cli.embedded import SeaweedS3
from watcher.core.refs import ObjectRef
from watcher.core.settings import SettingsError, load_settings
from watcher.intake.discovery import Discovery


class ListedStore:
    """In memory: what discovery lists, reads the metadata of, writes and deletes."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = set(keys)
        self.deleted: list[str] = []

    async def list_objects(self, prefix: str) -> Any:
        for key in sorted(k for k in self.keys if k.startswith(prefix)):
            yield ObjectRef(bucket="b", key=key, etag="e", size=1)

    async def head(self, key: str) -> dict[str, Any] | None:
        return {"Metadata": {SOURCE_ETAG_META: "e"}} if key in self.keys else None

    async def delete(self, key: str) -> None:
        self.keys.discard(key)
        self.deleted.append(key)

    async def put(self, key: str, body: bytes, content_type: str) -> str:
        self.keys.add(key)
        return "e"


def upload(s3: Any, bucket: str) -> list[str]:
    for name in ("gone.png", "stays.png"):
        s3.put_object(Bucket=bucket, Key=f"input/{name}", Body=make_image([f"Document {name}"], "PNG"))
    s3.put_object(Bucket=bucket, Key="output/notes.txt", Body=b"not a result of ours")
    return ["output/gone.png.json", "output/gone.png.md", "output/stays.png.json", "output/stays.png.md"]


async def test_results_outlive_their_deleted_source_by_default(weed: SeaweedS3, bucket: str, s3: Any) -> None:
    results = upload(s3, bucket)
    async with daemon_running(make_settings(weed, bucket)) as daemon:
        await wait_for_keys(s3, bucket, results)
        s3.delete_object(Bucket=bucket, Key="input/gone.png")
        await daemon.wait_polls(daemon.polls + 3, timeout=30)
    assert all(object_exists(s3, bucket, key) for key in results)


async def test_results_of_deleted_sources_are_removed_on_request(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    results = [*upload(s3, bucket), "output/gone.png.chunks.jsonl", "output/stays.png.chunks.jsonl",
               "output/gone.png.docling.json"]
    settings = make_settings(weed, bucket, results_of_deleted_sources="delete", chunks=True,
                             outputs="docling")
    async with daemon_running(settings):
        await wait_for_keys(s3, bucket, results)
        s3.delete_object(Bucket=bucket, Key="input/gone.png")
        # Missing from one listing is not enough; from two in a row it is.
        await eventually(lambda: not object_exists(s3, bucket, "output/gone.png.json"), 30,
                         "the result of the deleted source to be removed", every=0.3)
        await eventually(lambda: not object_exists(s3, bucket, "output/gone.png.chunks.jsonl"), 30,
                         "its chunks to be removed", every=0.3)
    assert not object_exists(s3, bucket, "output/gone.png.md")
    assert not object_exists(s3, bucket, "output/gone.png.docling.json")
    assert object_exists(s3, bucket, "output/stays.png.chunks.jsonl")
    assert object_exists(s3, bucket, "output/stays.png.json")
    assert object_exists(s3, bucket, "output/stays.png.md")
    assert object_exists(s3, bucket, "output/notes.txt")  # not a result: never touched


def test_removing_results_needs_sources_kept(weed: SeaweedS3, bucket: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(s3_endpoint=weed.endpoint, s3_bucket=bucket, s3_access_key="a:b", s3_secret_key="s",
                      results_of_deleted_sources="delete", source_action="move")
    assert any("WATCHER_SOURCE_ACTION=keep" in line for line in info.value.lines)


async def test_a_source_must_be_missing_from_two_listings_in_a_row() -> None:
    settings = load_settings(s3_endpoint="http://stand-in", s3_bucket="bucket", s3_access_key="a:b",
                             s3_secret_key="s", results_of_deleted_sources="delete")
    names = Names.from_settings(settings)
    store = ListedStore(["output/a.pdf.json", "output/a.pdf.md", "output/b.pdf.json",
                         "output/x.png.error.json", "output/readme.txt", "input/b.pdf", "input/x.png",
                         names.marker("input/a.pdf", "e"), names.marker("input/b.pdf", "e")])
    discovery = Discovery(store, settings, Names.from_settings(settings))  # type: ignore[arg-type]
    await discovery.scan()
    assert store.deleted == []  # seen missing once: could be an odd listing
    store.keys.add("input/a.pdf")  # back again: nothing to remove
    await discovery.scan()
    store.keys.discard("input/a.pdf")
    await discovery.scan()
    assert store.deleted == []
    await discovery.scan()
    removed = sorted(store.deleted)
    assert [k for k in removed if k.startswith("output/")] == ["output/a.pdf.json", "output/a.pdf.md"]
    # Its done-marker goes too: uploaded again, the source is read again.
    marker = Names.from_settings(settings).marker("input/a.pdf", "e")
    assert [k for k in removed if "/_done/" in k] == [marker]

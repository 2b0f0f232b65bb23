"""The S3 client against the real server: pagination, odd keys, conditional writes."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import make_settings

from watcher.bucket.storage import PreconditionFailed, StorageUnavailable, open_storage
from watcher.cli.embedded import SeaweedS3

KEYS = ["input/a b.pdf", "input/plus+sign.png", "input/pct%20x.png", "input/Привет мир.png",
        "input/deep/er/x.tif", "input/~tilde&amp.jpg", "input/folder/"]


async def test_listing_pages_through_every_object_with_odd_keys(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    for key in KEYS:
        s3.put_object(Bucket=bucket, Key=key, Body=b"" if key.endswith("/") else b"data")
    async with open_storage(make_settings(weed, bucket)) as storage:
        storage.list_page_size = 2  # force several ListObjectsV2 pages
        listed = [ref async for ref in storage.list_objects("input/")]
    assert sorted(r.key for r in listed) == sorted(KEYS)
    assert all(r.etag and '"' not in r.etag for r in listed)


async def test_conditional_writes_are_enforced(weed: SeaweedS3, bucket: str) -> None:
    async with open_storage(make_settings(weed, bucket)) as storage:
        first = await storage.put("lease", b"1", "text/plain", if_none_match=True)
        with pytest.raises(PreconditionFailed):
            await storage.put("lease", b"2", "text/plain", if_none_match=True)
        with pytest.raises(PreconditionFailed):
            await storage.put("lease", b"2", "text/plain", if_match="0" * 32)
        second = await storage.put("lease", b"3", "text/plain", if_match=first)
        assert second != first


async def test_wrong_credentials_and_dead_endpoints_are_reported_not_hung(
    weed: SeaweedS3, bucket: str
) -> None:
    async with open_storage(make_settings(weed, bucket, s3_endpoint="http://127.0.0.1:9",
                                          s3_max_attempts=2)) as storage:
        with pytest.raises(StorageUnavailable) as info:
            await storage.bucket_reachable()
    assert "head_bucket" in str(info.value)
    async with open_storage(make_settings(weed, bucket, s3_secret_key="wrong-secret-value")) as storage:
        with pytest.raises(StorageUnavailable) as info:
            await storage.bucket_reachable()
    assert "refused" in str(info.value) and "wrong-secret-value" not in str(info.value)

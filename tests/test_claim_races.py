"""Claims under races and cut-off publishes: a version is published once, and what a
replica left half-done is finished by the next, never redone."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import CountingEngine, make_settings
from docgen import make_image
from waiting import eventually

from watcher.bucket.done import Done, DoneMarkers
from watcher.bucket.leases import Inherited, Lease, Leases
from watcher.bucket.names import SOURCE_ETAG_META, Names
from watcher.bucket.storage import Storage, StorageUnavailable, open_storage
from watcher.cli.embedded import SeaweedS3
from watcher.core.metrics import Metrics
from watcher.core.outcome import Outcome
from watcher.core.refs import ObjectRef
from watcher.pipeline.document import DocumentPipeline
from watcher.service.hooks import MetricsHook


def upload(s3: Any, bucket: str, key: str) -> ObjectRef:
    s3.put_object(Bucket=bucket, Key=key, Body=make_image(["Raced"], "PNG"))
    head = s3.head_object(Bucket=bucket, Key=key)
    return ObjectRef(bucket, key, head["ETag"].strip('"'), head["ContentLength"])


def keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


async def test_a_version_published_between_the_check_and_the_lease_is_not_redone(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    settings = make_settings(weed, bucket)
    names = Names.from_settings(settings)
    ref = upload(s3, bucket, "input/raced.png")
    engine = CountingEngine()
    async with open_storage(settings) as storage:
        worker = DocumentPipeline.reading_with(engine, settings, storage, Metrics())
        first = await worker.process(ref)
        assert first.outcome is Outcome.DONE and engine.calls == [0]
        stamp = s3.head_object(Bucket=bucket, Key=names.result_json(ref.key))["ETag"]
        # The race: this replica's quick check ran before the other published.
        late = DocumentPipeline.reading_with(engine, settings, storage, Metrics())

        real_check = late.claimer.done.marked

        async def not_yet(_ref: ObjectRef) -> Done | None:
            late.claimer.done.marked = real_check  # type: ignore[method-assign]
            return None  # the first look only

        late.claimer.done.marked = not_yet  # type: ignore[method-assign]
        assert (await late.process(ref)).outcome is Outcome.SKIPPED
        await worker.close()
        await late.close()
    assert engine.calls == [0]  # read once
    assert s3.head_object(Bucket=bucket, Key=names.result_json(ref.key))["ETag"] == stamp  # untouched
    assert keys(s3, bucket, ".watcher/leases/input/") == []


async def test_a_result_whose_publisher_was_cut_off_is_finished_not_redone(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    # The other replica wrote the result, then S3 went away before its marker and settle.
    settings = make_settings(weed, bucket, source_action="move")
    names = Names.from_settings(settings)
    ref = upload(s3, bucket, "input/cut.png")
    result = {"schema_version": "1.1", "source": {"key": ref.key, "etag": ref.etag}, "pages": []}
    s3.put_object(Bucket=bucket, Key=names.result_json(ref.key), Body=json.dumps(result).encode(),
                  Metadata={SOURCE_ETAG_META: ref.etag})
    engine = CountingEngine()
    metrics = Metrics()
    async with open_storage(settings) as storage:
        worker = DocumentPipeline.reading_with(engine, settings, storage, metrics)
        report = await worker.process(ref)
        MetricsHook(metrics, lambda: None).ended(report)
        assert report.outcome is Outcome.DONE
        await worker.close()
    assert engine.calls == []
    assert keys(s3, bucket, names.marker(ref.key, ref.etag)) == [names.marker(ref.key, ref.etag)]
    assert keys(s3, bucket, "input/") == [] and keys(s3, bucket, "done/") == ["done/cut.png"]  # settled
    assert keys(s3, bucket, ".watcher/leases/input/") == []
    assert metrics.documents.labels("done")._value.get() == 1


async def test_an_error_record_without_a_marker_is_marked_and_skipped(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    settings = make_settings(weed, bucket)
    names = Names.from_settings(settings)
    ref = upload(s3, bucket, "input/failed.png")
    s3.put_object(Bucket=bucket, Key=names.error_json(ref.key), Body=b"{}",
                  Metadata={SOURCE_ETAG_META: ref.etag})
    async with open_storage(settings) as storage:
        done = DoneMarkers(storage, names)
        assert await done.check(ref) is Done.ERROR_RECORD
        assert await done.check(ref) is Done.ERROR_MARKED  # marked now: no HEAD of the output
        assert await done.check(ObjectRef(bucket, ref.key, "0" * 32, 1)) is None  # another version


async def later_deletes_done(leases: Leases) -> None:
    await eventually(lambda: not leases._later, 30, "the deferred lease deletes", every=0.05)
    await leases.close()


class FlakyDeletes:
    """The real store, except that the first `failures` deletes find S3 away."""

    def __init__(self, storage: Storage, failures: int) -> None:
        self.storage = storage
        self.failures = failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)

    async def delete(self, key: str, if_match: str | None = None) -> bool:
        if self.failures > 0:
            self.failures -= 1
            raise StorageUnavailable("S3 delete failed: connection refused")
        return await self.storage.delete(key, if_match)


async def test_a_lease_s3_would_not_delete_is_deleted_once_it_is_back(
    weed: SeaweedS3, bucket: str, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(weed, bucket)
    names = Names.from_settings(settings)
    ref = upload(s3, bucket, "input/kept.png")
    monkeypatch.setattr("watcher.bucket.leases.LATER_FIRST_SECONDS", 0.01)
    async with open_storage(settings) as real:
        leases = Leases(FlakyDeletes(real, failures=3), settings, names)  # type: ignore[arg-type]
        lease = await leases.acquire(ref)
        assert isinstance(lease, Lease)
        await lease.finish()  # S3 away: the delete fails and is tried again later
        await later_deletes_done(leases)
    assert keys(s3, bucket, names.lease(ref.key)) == []


async def test_a_delayed_delete_never_removes_another_replicas_lease(
    weed: SeaweedS3, bucket: str, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(weed, bucket)
    names = Names.from_settings(settings)
    ref = upload(s3, bucket, "input/taken.png")
    monkeypatch.setattr("watcher.bucket.leases.LATER_FIRST_SECONDS", 0.01)
    async with open_storage(settings) as real:
        flaky = FlakyDeletes(real, failures=1)
        leases = Leases(flaky, settings, names)  # type: ignore[arg-type]
        lease = await leases.acquire(ref)
        assert isinstance(lease, Lease)
        # Meanwhile the key went to another replica (our lease expired, a new version came).
        other = Leases(real, make_settings(weed, bucket, replica_id="someone-else"), names)
        theirs = other.record(ObjectRef(bucket, ref.key, "f" * 32, 1), Inherited(), False)
        monkeypatch.setattr(flaky, "delete", _overwrite_then_fail(flaky, real, names.lease(ref.key),
                                                                  theirs.encode()))
        await lease.finish()
        await later_deletes_done(leases)
    body = s3.get_object(Bucket=bucket, Key=names.lease(ref.key))["Body"].read()
    assert json.loads(body)["owner"] == "someone-else"


def _overwrite_then_fail(flaky: FlakyDeletes, real: Storage, key: str, body: bytes) -> Any:
    async def delete(_key: str, if_match: str | None = None) -> bool:
        await real.put(key, body, "application/json")
        flaky.delete = real.delete  # type: ignore[method-assign]
        raise StorageUnavailable("S3 delete failed: connection refused")

    return delete

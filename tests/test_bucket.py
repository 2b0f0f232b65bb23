"""The bucket's pieces over the in-memory S3 (fast, on virtual time where time matters):
exact downloads, conditional writes whose answer was lost, leases as fences, the work
queue's one version per key, bounded memory."""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Any

import pytest
from memory_s3 import Faults, MemoryS3
from simulation import VirtualClock, run_virtual

from watcher.bucket.leases import Held, Lease, LeaseLost, Leases
from watcher.bucket.names import Names
from watcher.bucket.storage import ObjectTooLarge, PreconditionFailed, Storage
from watcher.core.bounded import BoundedSet
from watcher.core.identity import Identity
from watcher.core.refs import ObjectRef
from watcher.core.settings import Settings, load_settings
from watcher.intake.queue import WorkQueue

BUCKET = "unit"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"s3_endpoint": "http://memory.invalid", "s3_bucket": BUCKET,
                              "s3_access_key": "t:k", "s3_secret_key": "s", "lease_seconds": 10}
    values.update(overrides)
    return load_settings(**values)


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.restarts = 0

    def restart(self) -> None:
        self.data.clear()
        self.restarts += 1

    def write(self, chunk: bytes) -> None:
        self.data.extend(chunk)


def test_a_cut_download_starts_over_and_ends_with_exact_bytes() -> None:
    async def main() -> None:
        store = MemoryS3(random.Random(3), Faults(cut_body=1.0))
        body = bytes(range(256)) * 400
        etag = store.put("input/a.pdf", body)
        storage = Storage(store.client("r"), BUCKET, max_attempts=5)
        sink = Sink()
        real_get = store.client("r").get_object
        client = store.client("r")

        async def cut_once(**kwargs: Any) -> dict[str, Any]:
            answer = await real_get(**kwargs)
            store.faults.cut_body = 0.0  # the first body is cut half-way; then all is well
            return answer

        client.get_object = cut_once  # type: ignore[method-assign]
        storage = Storage(client, BUCKET, max_attempts=5)
        got = await storage.download(ObjectRef(BUCKET, "input/a.pdf", etag, 0), sink, 10**9)
        # Started over: not the cut half followed by the whole.
        assert bytes(sink.data) == body and got.size == len(body) and sink.restarts == 2
        assert hashlib.md5(bytes(sink.data)).hexdigest() == etag

    run_virtual(main)


def test_the_byte_limit_holds_before_and_while_streaming() -> None:
    async def main() -> None:
        store = MemoryS3()
        etag = store.put("input/big.pdf", b"x" * 5000)
        storage = Storage(store.client("r"), BUCKET, max_attempts=2)
        with pytest.raises(ObjectTooLarge) as announced:
            await storage.download(ObjectRef(BUCKET, "input/big.pdf", etag, 1), Sink(), 4999)
        assert announced.value.exact and announced.value.size == 5000
        # A response that announces nothing is stopped once more than the limit arrived.
        real_get = store.client("r").get_object

        async def unannounced(**kwargs: Any) -> dict[str, Any]:
            answer = await real_get(**kwargs)
            del answer["ContentLength"]
            return answer

        client = store.client("r")
        client.get_object = unannounced  # type: ignore[method-assign]
        sink = Sink()
        with pytest.raises(ObjectTooLarge) as streamed:
            await Storage(client, BUCKET, max_attempts=2).download(
                ObjectRef(BUCKET, "input/big.pdf", etag, 1), sink, 4999)
        assert not streamed.value.exact and len(sink.data) <= 4999

    run_virtual(main)


def test_a_conditional_write_whose_answer_was_lost_is_recognised_as_ours() -> None:
    async def main() -> None:
        store = MemoryS3(random.Random(1), Faults(lost_response=1.0))
        storage = Storage(store.client("r"), BUCKET, max_attempts=3)

        def once(_request: Any) -> None:
            store.faults.lost_response = 0.0  # only the first write's answer is lost

        store.watch = once
        etag = await storage.put("leases/x.lease", b"mine", "application/json", if_none_match=True)
        assert etag == hashlib.md5(b"mine").hexdigest()
        # Someone else's object is not mistaken for ours.
        store.put("leases/y.lease", b"theirs")
        store.faults.lost_response = 0.0
        with pytest.raises(PreconditionFailed):
            await storage.put("leases/y.lease", b"mine", "application/json", if_none_match=True)

    run_virtual(main)


def leases_for(store: MemoryS3, clock: VirtualClock, replica: str, pid: int,
               alive: set[int] | None = None) -> Leases:
    s = settings(replica_id=replica)
    identity = Identity(replica, host=f"host-{replica}", pid=pid, incarnation=f"{replica}-{pid}",
                        clock=clock.wall, alive=(alive or {pid}).__contains__)
    return Leases(Storage(store.client(replica), BUCKET, 3), s, Names.from_settings(s), identity)


def test_a_lease_is_lost_once_its_expiry_passes_without_a_renewal() -> None:
    clock = VirtualClock()

    async def main() -> None:
        store = MemoryS3(random.Random(2))
        leases = leases_for(store, clock, "one", 1)
        ref = ObjectRef(BUCKET, "input/a.pdf", "e" * 32, 1)
        lease = await leases.acquire(ref)
        assert isinstance(lease, Lease) and lease.valid()
        await lease.fence()
        store.faults.server_error = 1.0  # S3 away: renewals keep failing
        await asyncio.sleep(9)
        assert not lease.valid()
        with pytest.raises(LeaseLost):
            await lease.fence()
        store.faults.server_error = 0.0
        await lease.release()

    run_virtual(main, clock)


def test_a_renewer_that_hits_a_bug_goes_on_renewing() -> None:
    clock = VirtualClock()

    async def main() -> None:
        store = MemoryS3()
        leases = leases_for(store, clock, "one", 1)
        lease = await leases.acquire(ObjectRef(BUCKET, "input/a.pdf", "e" * 32, 1))
        assert isinstance(lease, Lease)
        real_write = leases.write
        broken = {"left": 1}

        async def write(*args: Any, **kwargs: Any) -> Any:
            if broken["left"]:
                broken["left"] -= 1
                raise RuntimeError("a bug in the renewal")
            return await real_write(*args, **kwargs)

        leases.write = write  # type: ignore[method-assign]
        # Renewals at 3.3 s (the bug) and 6.7 s: without the second the lease would count
        # as lost from 8 s (its expiry, 10 s, less the margin).
        await asyncio.sleep(9)
        assert broken["left"] == 0 and lease.valid()
        await lease.finish()
        assert store.keys(".watcher/leases/") == []

    run_virtual(main, clock)


def test_a_lease_taken_over_is_never_deleted_by_its_old_holder() -> None:
    clock = VirtualClock()

    async def main() -> None:
        store = MemoryS3()
        ref = ObjectRef(BUCKET, "input/a.pdf", "e" * 32, 1)
        old = leases_for(store, clock, "old", 1)
        lease = await old.acquire(ref)
        assert isinstance(lease, Lease)
        assert lease._renewer is not None
        lease._renewer.cancel()  # its holder froze: no renewal from here on
        await asyncio.sleep(60)
        new = leases_for(store, clock, "new", 2)
        theirs = await new.acquire(ref)
        assert isinstance(theirs, Lease) and theirs.crashes == 1
        await lease.finish()  # conditional on its own last write: refused
        assert store.keys(".watcher/leases/") == [new.names.lease(ref.key)]
        await theirs.finish()
        assert store.keys(".watcher/leases/") == []

    run_virtual(main, clock)


def test_one_process_holds_one_version_of_a_key_at_a_time() -> None:
    clock = VirtualClock()

    async def main() -> None:
        store = MemoryS3()
        leases = leases_for(store, clock, "one", 1)
        v1 = ObjectRef(BUCKET, "input/a.pdf", "1" * 32, 1)
        v2 = ObjectRef(BUCKET, "input/a.pdf", "2" * 32, 1)
        first = await leases.acquire(v1)
        assert isinstance(first, Lease)
        assert isinstance(await leases.acquire(v2), Held)  # never the lease v1 still holds
        await first.finish()
        second = await leases.acquire(v2)
        assert isinstance(second, Lease)
        await second.finish()

    run_virtual(main, clock)


def test_the_queue_lets_a_new_version_wait_for_the_one_in_flight() -> None:
    async def main() -> None:
        queue = WorkQueue(10)
        v1 = ObjectRef(BUCKET, "input/a.pdf", "1" * 32, 1)
        v2 = ObjectRef(BUCKET, "input/a.pdf", "2" * 32, 1)
        other = ObjectRef(BUCKET, "input/b.pdf", "3" * 32, 1)
        assert queue.offer(v1) and queue.offer(v2) and queue.offer(other)
        assert await queue.take() == v1
        assert await queue.take() == other  # v2 waits for v1
        waiting = asyncio.create_task(queue.take())
        await asyncio.sleep(1)
        assert not waiting.done()
        queue.finish(v1)
        assert await waiting == v2
        assert not queue.offer(v2)  # in flight: not queued twice

    run_virtual(main)


def test_bounded_sets_forget_the_oldest() -> None:
    remembered: BoundedSet[int] = BoundedSet(3)
    for n in range(5):
        remembered.add(n)
    assert [n in remembered for n in range(5)] == [False, False, True, True, True]
    remembered.add(2)  # seen again: newest now
    remembered.add(5)
    assert 2 in remembered and 3 not in remembered and len(remembered) == 3
    remembered.keep_only({5})
    assert len(remembered) == 1

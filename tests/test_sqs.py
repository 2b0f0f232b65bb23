"""SQS notifications, against moto's real server: its S3 sends ObjectCreated notifications
to its own SQS queue (directly, or through an SNS topic), the daemon reads them, starts
documents at once, keeps each message hidden while its document runs, and deletes it only
once the document settled; messages naming nothing for us are deleted at once."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from conftest import CountingEngine, GatedEngine, daemon_running, wait_for_keys
from docgen import make_image
from tenacity import RetryCallState
from waiting import eventually, eventually_sync

from watcher.cli.check import Checker
from watcher.core.outcome import Outcome, Report
from watcher.core.refs import ObjectRef
from watcher.core.settings import Settings, load_settings
from watcher.engines import EngineState
from watcher.intake import sqs as sqs_module
from watcher.intake.queue import WorkQueue
from watcher.intake.sqs import SqsSource
from watcher.service.daemon import Daemon

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening() -> bool:
        if server.poll() is not None:
            raise RuntimeError(f"moto's server did not start: it exited {server.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    try:
        eventually_sync(listening, 30, "moto's server to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


@dataclass
class Moto:
    endpoint: str
    bucket: str
    queue_url: str
    s3: Any
    sqs: Any

    def counts(self) -> tuple[int, int]:
        """(visible, hidden) messages in the queue."""
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        got = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=names)["Attributes"]
        return int(got[names[0]]), int(got[names[1]])

    async def empty(self) -> bool:
        """No message in the queue, visible or hidden (asked from a thread: boto3 blocks)."""
        return await asyncio.to_thread(self.counts) == (0, 0)

    def send(self, body: Any) -> None:
        text = body if isinstance(body, str) else json.dumps(body)
        self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=text)


def clients(endpoint: str) -> tuple[Any, Any, Any]:
    options = {"endpoint_url": endpoint, "region_name": REGION, "aws_access_key_id": "moto-key",
               "aws_secret_access_key": "moto-secret"}
    return boto3.client("s3", **options), boto3.client("sqs", **options), boto3.client("sns", **options)


def new_moto(endpoint: str, via_sns: bool = False) -> Moto:
    """A fresh bucket whose ObjectCreated notifications under input/ go to a fresh queue."""
    s3, sqs, sns = clients(endpoint)
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    wanted = {"Events": ["s3:ObjectCreated:*"],
              "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "input/"}]}}}
    if via_sns:
        topic = sns.create_topic(Name=name)["TopicArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)
        config = {"TopicConfigurations": [{"TopicArn": topic, **wanted}]}
    else:
        config = {"QueueConfigurations": [{"QueueArn": queue_arn, **wanted}]}
    # moto, like AWS, sends an s3:TestEvent to the destination now.
    s3.put_bucket_notification_configuration(Bucket=name, NotificationConfiguration=config)
    return Moto(endpoint, name, url, s3, sqs)


@pytest.fixture
def moto(moto_endpoint: str) -> Moto:
    return new_moto(moto_endpoint)


def moto_settings(moto: Moto, **overrides: Any) -> Settings:
    # The SQS region and keys fall back to the S3 ones.
    values: dict[str, Any] = {
        "s3_endpoint": moto.endpoint, "s3_bucket": moto.bucket, "s3_region": REGION,
        "s3_access_key": "moto-key", "s3_secret_key": "moto-secret",
        "sqs_queue_url": moto.queue_url, "sqs_endpoint": moto.endpoint,
        # The poll runs once at start and then not for five minutes: only SQS can start work.
        "poll_interval": 300, "http_port": 0, "http_host": "127.0.0.1", "lease_seconds": 10,
        "drain_seconds": 20, "s3_max_attempts": 3, "s3_connect_timeout": 1, "s3_read_timeout": 10,
        "render_dpi": 100,
    }
    values.update(overrides)
    return load_settings(**values)


async def ready(daemon: Daemon) -> SqsSource:
    """The first poll is over, the engine warm and moto's test event deleted."""
    await daemon.wait_polls(1, timeout=30)
    await eventually(lambda: daemon.engine.state is EngineState.READY, 120, "the engine is ready")
    assert daemon.sqs is not None
    sqs = daemon.sqs
    await eventually(lambda: sqs.snapshot()["deleted"] >= 1, 30, "the test event is deleted")
    return sqs


@pytest.mark.parametrize("via_sns", [False, True], ids=["s3-to-sqs", "s3-to-sns-to-sqs"])
async def test_a_notification_starts_a_document_and_its_message_goes_once_published(
    moto_endpoint: str, via_sns: bool
) -> None:
    moto = new_moto(moto_endpoint, via_sns)
    engine = CountingEngine()
    async with daemon_running(moto_settings(moto), engine) as daemon:
        sqs = await ready(daemon)
        # moto, like AWS, URL-encodes the key in the record ("/" as %2F, " " as "+").
        key = "input/scan 1 ü+x.png"
        moto.s3.put_object(Bucket=moto.bucket, Key=key, Body=make_image(["Queued notice"], "PNG"))
        await wait_for_keys(moto.s3, moto.bucket, ["output/scan 1 ü+x.png.json"], timeout=30)
        await eventually(moto.empty, 15, "the queue is empty", every=0.2)
        assert daemon.polls == 1
        assert sqs.snapshot() == {"received": 2, "deleted": 2, "in_progress": 0, "reachable": True,
                                  "last_error": None}
    assert engine.calls == [0]


async def test_test_events_malformed_and_foreign_messages_are_deleted_and_start_nothing(
    moto: Moto,
) -> None:
    def record(bucket: str, key: str, event: str = "ObjectCreated:Put") -> dict[str, Any]:
        return {"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": REGION,
                             "eventTime": "2026-12-01T10:00:00.000Z", "eventName": event,
                             "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket},
                                    "object": {"key": key, "size": 10, "eTag": "e" * 32}}}]}

    # Besides moto's own s3:TestEvent (sent when the notification was set up):
    moto.send("{not json")
    moto.send({"Records": "nope"})
    moto.send(record("another-bucket", "input%2Fx.png"))
    moto.send(record(moto.bucket, "elsewhere%2Fx.png"))
    moto.send(record(moto.bucket, "input%2Fx.png", "ObjectRemoved:Delete"))
    moto.send({"Type": "Notification", "Message": json.dumps(
        {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": moto.bucket})})
    engine = CountingEngine()
    async with daemon_running(moto_settings(moto), engine) as daemon:
        assert daemon.sqs is not None
        sqs = daemon.sqs
        await eventually(moto.empty, 15, "the queue is empty", every=0.2)
        await eventually(lambda: sqs.snapshot()["deleted"] == 7, 5, "all are deleted")
        assert sqs.snapshot()["received"] == 7 and sqs.snapshot()["in_progress"] == 0
        assert daemon.queue.unfinished() == 0
    assert engine.calls == []
    assert "Contents" not in moto.s3.list_objects_v2(Bucket=moto.bucket, Prefix="output/")


async def test_a_message_stays_hidden_while_its_document_runs_and_goes_after(moto: Moto) -> None:
    engine = GatedEngine()
    async with daemon_running(moto_settings(moto, sqs_visibility_seconds=10), engine) as daemon:
        sqs = await ready(daemon)
        moto.s3.put_object(Bucket=moto.bucket, Key="input/slow.png", Body=make_image(["Slow one"], "PNG"))
        await asyncio.wait_for(engine.entered.wait(), 60)
        received = sqs.snapshot()["received"]
        # Well past the 10 s visibility timeout: without extensions the message would be
        # visible again, and taken by this reader or by the daemon (as a repeat, deleted).
        deadline = time.monotonic() + 13
        while (left := deadline - time.monotonic()) > 0:
            answer = await asyncio.to_thread(moto.sqs.receive_message, QueueUrl=moto.queue_url,
                                             WaitTimeSeconds=max(1, min(5, int(left))))
            assert answer.get("Messages", []) == []
        assert moto.counts() == (0, 1)
        assert sqs.snapshot()["received"] == received and sqs.snapshot()["in_progress"] == 1
        engine.gate.set()
        await wait_for_keys(moto.s3, moto.bucket, ["output/slow.png.json"], timeout=30)
        await eventually(moto.empty, 15, "the message is deleted", every=0.2)
        assert sqs.snapshot()["in_progress"] == 0
    assert engine.calls == [0]


async def test_a_run_to_retry_keeps_its_message_which_comes_back(moto: Moto) -> None:
    queue = WorkQueue(10)
    source = SqsSource(moto_settings(moto, sqs_visibility_seconds=10), queue, lambda: None)
    deletes: list[str] = []
    delete = source._delete

    async def counted(receipt: str) -> None:
        deletes.append(receipt)
        await delete(receipt)

    source._delete = counted  # type: ignore[method-assign]
    reading = asyncio.create_task(source.run())
    try:
        await eventually(lambda: source.snapshot()["deleted"] == 1, 30, "the test event is deleted")
        moto.s3.put_object(Bucket=moto.bucket, Key="input/again.png", Body=b"not read here")
        ref = await asyncio.wait_for(queue.take(), 30)
        assert ref.key == "input/again.png" and source.snapshot()["in_progress"] == 1
        queue.finish(ref)
        source.ended(Report(ref, Outcome.RETRY))
        assert source.snapshot()["in_progress"] == 0
        assert len(deletes) == 1 and moto.counts() == (0, 1)  # kept, hidden until its timeout
        # Back after the visibility timeout, offered again (not dropped as a repeat).
        again = await asyncio.wait_for(queue.take(), 30)
        assert again == ref and len(deletes) == 1 and source.snapshot()["received"] == 3
        queue.finish(again)
        source.ended(Report(again, Outcome.DONE))
        await eventually(moto.empty, 10, "the message is deleted", every=0.2)
        assert len(deletes) == 2
        # At shutdown, a message whose document never ran is handed back at once.
        moto.s3.put_object(Bucket=moto.bucket, Key="input/unstarted.png", Body=b"not read here")
        await eventually(lambda: source.snapshot()["in_progress"] == 1, 30, "the message is held")
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
    assert moto.counts() == (1, 0)


async def test_a_message_for_a_document_the_poll_queued_first_waits_for_it(moto: Moto) -> None:
    queue = WorkQueue(10)
    source = SqsSource(moto_settings(moto), queue, lambda: None)
    reading = asyncio.create_task(source.run())
    try:
        await eventually(lambda: source.snapshot()["deleted"] == 1, 30, "the test event is deleted")
        body = b"not read here"
        polled = ObjectRef(moto.bucket, "input/polled.png", hashlib.md5(body).hexdigest(), len(body))
        assert queue.offer(polled)  # the poll found it before its message came
        moto.s3.put_object(Bucket=moto.bucket, Key="input/polled.png", Body=body)
        await eventually(lambda: source.snapshot()["in_progress"] == 1, 30, "the message is held")
        assert moto.counts() == (0, 1)  # not deleted: its document has no result yet
        ref = await asyncio.wait_for(queue.take(), 5)
        queue.finish(ref)
        source.ended(Report(ref, Outcome.DONE))
        await eventually(moto.empty, 10, "the message is deleted", every=0.2)
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)


class Recorder:
    """Stands in for a module's logger: keeps (level, event) of each line."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, *args, **fields: self.lines.append((level, event))


async def test_a_missing_queue_is_logged_once_read_again_until_it_exists_and_cancelling_is_prompt(
    moto: Moto, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"later-{uuid.uuid4().hex[:8]}"
    url = f"{moto.endpoint}/{ACCOUNT}/{name}"
    logs = Recorder()
    waits: list[int] = []

    def backoff(state: RetryCallState) -> float:
        waits.append(state.attempt_number)  # the failures in a row
        return 0.05

    monkeypatch.setattr(sqs_module, "log", logs)
    monkeypatch.setattr(sqs_module, "RECEIVE_BACKOFF", backoff)
    source = SqsSource(moto_settings(moto, sqs_queue_url=url), WorkQueue(10), lambda: None)
    reading = asyncio.create_task(source.run())
    try:
        await eventually(lambda: len(waits) >= 5, 30, "five receives failed")
        snapshot = source.snapshot()
        assert snapshot["reachable"] is False and "NonExistentQueue" in str(snapshot["last_error"])
        assert waits[:5] == [1, 2, 3, 4, 5]
        assert [line for line in logs.lines if line[1] == "sqs_error"] == [("error", "sqs_error")]
        made = moto.sqs.create_queue(QueueName=name)["QueueUrl"]
        # A message ends the long poll at once (an empty one lasts 20 s).
        moto.sqs.send_message(QueueUrl=made, MessageBody=json.dumps({"Event": "s3:TestEvent"}))
        await eventually(lambda: source.snapshot()["reachable"] is True, 30, "the queue is read")
        assert ("info", "sqs_reachable_again") in logs.lines and source.snapshot()["last_error"] is None
    finally:
        reading.cancel()
        # It was waiting in a 20-second long poll: cancelling must not wait for it.
        await asyncio.wait_for(asyncio.gather(reading, return_exceptions=True), 5)


def test_watcher_check_reads_the_queue(moto: Moto, capsys: pytest.CaptureFixture[str]) -> None:
    assert asyncio.run(Checker(moto_settings(moto)).run()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("ok   SQS queue") and "messages waiting" in line for line in lines), lines
    missing = moto_settings(moto, sqs_queue_url=f"{moto.endpoint}/{ACCOUNT}/no-such-queue")
    asyncio.run(Checker(missing).run())
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("FAIL SQS queue") for line in lines), lines

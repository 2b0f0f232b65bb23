"""An SQS queue of S3 notifications, so that a new document starts at once.

Webhooks (`POST /events`) need the daemon reachable from the store; a queue needs only
the daemon reaching out, survives the daemon's restarts and spreads work over replicas.
A bucket's ObjectCreated notifications, sent to an SQS-compatible queue directly or
through an SNS topic, are parsed by the same code as webhooks (events.py) and offered to
the work queue. The periodic poll stays the backstop: a lost, late or malformed message
never loses a document, it only delays it to the next poll.

A message is deleted once each document it names is settled: it has a result or an error
record, or it is not ours to do. While a document is queued or in progress its message
is kept hidden from other readers (its visibility is extended every third of
WATCHER_SQS_VISIBILITY_SECONDS); a run to be retried, or one whose lease another replica
holds, lets its message go, and the queue delivers it again after the visibility timeout.
Messages naming nothing for us (other buckets or prefixes, removals, test events,
repeats) and bodies that are not notifications are deleted at once. An unreachable queue
is logged once per outage and retried with backoff; reading never ends before shutdown.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    wait_random_exponential,
)

from watcher.bucket.names import Names
from watcher.core.logs import get_logger
from watcher.core.outcome import FINISHED, Report
from watcher.core.refs import ObjectRef
from watcher.core.settings import Settings
from watcher.intake.events import BadEvent, EventIntake

log = get_logger("watcher.intake.sqs")

WAIT_SECONDS = 20  # long polling: the longest SQS allows
BATCH = 10  # messages per receive and entries per batch call: the most SQS allows
# An unreachable queue is asked again after a jittered wait doubling from 1 s to a minute.
RECEIVE_BACKOFF = wait_random_exponential(multiplier=1.0, max=60.0)
# At shutdown, deletes still under way and hand-backs of unstarted messages get this long.
CLOSE_SECONDS = 5.0

Version = tuple[str, str]  # key, ETag


class Offers(Protocol):
    """The work queue, as far as this source needs it."""

    def offer(self, ref: ObjectRef) -> bool: ...

    def is_pending(self, ref: ObjectRef) -> bool: ...


@dataclass
class _InProgress:
    """A received message whose documents are queued or in progress."""

    receipt: str
    waiting: set[Version]


class SqsSource:
    """Reads S3 notifications from an SQS queue and offers the documents they name."""

    def __init__(self, settings: Settings, queue: Offers, poke: Callable[[], None],
                 stopping: Callable[[], bool] = lambda: False,
                 counted: Callable[[str], None] = lambda _result: None) -> None:
        if not settings.sqs_queue_url:
            raise ValueError("SqsSource needs WATCHER_SQS_QUEUE_URL")
        self.settings = settings
        self.url = settings.sqs_queue_url
        self.visibility = settings.sqs_visibility_seconds
        self.queue = queue
        self.stopping = stopping
        self.intake = EventIntake(settings.s3_bucket, Names.from_settings(settings), queue.offer, poke)
        self.received = 0
        self.deleted = 0
        self.counted = counted  # told "received" / "deleted" per message
        self.reachable: bool | None = None
        self.last_error: str | None = None
        self._in_progress: dict[str, _InProgress] = {}  # message id -> message
        self._messages_of: dict[Version, list[str]] = {}  # document -> ids of messages naming it
        self._client: Any = None
        self._tasks: set[asyncio.Task[None]] = set()

    def snapshot(self) -> dict[str, Any]:
        """For /health: counts since start, and what went wrong last (None while reachable)."""
        return {"received": self.received, "deleted": self.deleted, "in_progress": len(self._in_progress),
                "reachable": self.reachable, "last_error": self.last_error}

    # --- life --------------------------------------------------------------------------
    async def run(self) -> None:
        """Receive until the daemon stops; then stay, to delete the messages of documents
        the drain finishes, until cancelled. Messages still held then are handed back."""
        async with open_sqs(self.settings) as client:
            self._client = client
            extender = asyncio.create_task(self._extend_forever(), name="sqs-extend")
            try:
                await self._receive_forever()
                await asyncio.Event().wait()
            finally:
                extender.cancel()
                await asyncio.gather(extender, return_exceptions=True)
                await self._close()

    async def _close(self) -> None:
        """Let deletes under way finish; hand back messages whose documents never ran (or
        were cancelled by the drain), so that another replica takes them at once."""
        handed_back = [held.receipt for held in self._in_progress.values()]
        self._in_progress.clear()
        work = set(self._tasks)
        if handed_back:
            work.add(asyncio.create_task(self._set_visibility(handed_back, 0)))
        if work:
            _done, late = await asyncio.wait(work, timeout=CLOSE_SECONDS)
            for task in late:
                task.cancel()
        self._client = None

    # --- receiving ---------------------------------------------------------------------
    async def _receive_forever(self) -> None:
        while not self.stopping():
            try:
                answer = await self._receive()
            except RetryError:  # the daemon stopped while the queue was away
                return
            if self.reachable is False:
                log.info("sqs_reachable_again")
            self.reachable, self.last_error = True, None
            for message in answer.get("Messages", []):
                self._take_guarded(message)

    async def _receive(self) -> dict[str, Any]:
        """One long poll. Whatever goes wrong, the queue is asked again with backoff until
        it answers or the daemon stops, and /health says why."""
        answer: dict[str, Any] = {}
        async for attempt in AsyncRetrying(
                wait=RECEIVE_BACKOFF, retry=retry_if_exception_type(Exception),
                stop=lambda _state: self.stopping(), after=self._receive_failed):
            with attempt:
                answer = await self._client.receive_message(
                    QueueUrl=self.url, MaxNumberOfMessages=BATCH, WaitTimeSeconds=WAIT_SECONDS,
                    VisibilityTimeout=self.visibility)
        return answer

    def _receive_failed(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, Exception):
            self._trouble("receive", exc)

    def _take_guarded(self, message: dict[str, Any]) -> None:
        self.received += 1
        self.counted("received")
        try:
            self._take(message)
        except Exception as exc:
            # A bug must cost one message, never the reading: the poll finds its documents.
            log.error("sqs_message_failed", message_id=message.get("MessageId"),
                      error=f"{type(exc).__name__}: {exc}", exc_info=True)
            self._delete_later(str(message.get("ReceiptHandle", "")))

    def _take(self, message: dict[str, Any]) -> None:
        message_id = str(message.get("MessageId", ""))
        receipt = str(message.get("ReceiptHandle", ""))
        body = str(message.get("Body", ""))
        held = self._in_progress.get(message_id)
        if held is not None:
            held.receipt = receipt  # back to us while its documents run: keep holding it
            return
        if self.stopping():
            self._spawn(self._set_visibility([receipt], 0))  # another replica's to take
            return
        try:
            found = self.intake.refs(_unwrap(body))
        except BadEvent as exc:
            log.warning("sqs_message_malformed", message_id=message_id, error=str(exc), bytes=len(body))
            self._delete_later(receipt)
            return
        waiting, full = self._offer(found.refs)
        if full:
            log.info("sqs_work_queue_full", message_id=message_id)
            return  # not held: the queue delivers it again after its visibility timeout
        if not waiting:
            self._delete_later(receipt)  # nothing of ours to do
            return
        self._in_progress[message_id] = _InProgress(receipt, waiting)
        for version in waiting:
            self._messages_of.setdefault(version, []).append(message_id)

    def _offer(self, refs: list[ObjectRef]) -> tuple[set[Version], bool]:
        """The documents offered, and whether the work queue was too full for some."""
        waiting: set[Version] = set()
        full = False
        for ref in refs:
            if self.queue.offer(ref):
                waiting.add(_version(ref))
                log.info("sqs_document_offered", key=ref.key, etag=ref.etag)
            elif self.queue.is_pending(ref):
                waiting.add(_version(ref))  # the poll queued it first: held until it is settled
            else:
                full = True
                self.intake.forget(ref)  # offered again when its message comes back
        return waiting, full

    # --- settling ----------------------------------------------------------------------
    def ended(self, report: Report) -> None:
        """The daemon ran a document (an outcome hook). A message is deleted once each
        document it names has a record or is not ours to do; a run to look at again lets
        its messages go."""
        ref = report.ref
        keep = report.outcome not in FINISHED  # to look at again: its message comes back
        if keep:
            self.intake.forget(ref)
        for message_id in self._messages_of.pop(_version(ref), []):
            held = self._in_progress.get(message_id)
            if held is None:
                continue
            if keep:
                del self._in_progress[message_id]  # no longer extended: back after its visibility timeout
                continue
            held.waiting.discard(_version(ref))
            if not held.waiting:
                del self._in_progress[message_id]
                self._delete_later(held.receipt)

    def _delete_later(self, receipt: str) -> None:
        self._spawn(self._delete(receipt))

    async def _delete(self, receipt: str) -> None:
        try:
            await self._client.delete_message(QueueUrl=self.url, ReceiptHandle=receipt)
        except Exception as exc:  # it comes back, and is deleted then as a repeat
            self._trouble("delete", exc)
            return
        self.deleted += 1
        self.counted("deleted")

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        if self._client is None:  # not running (yet, or any more): the message comes back
            work.close()
            return
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- visibility --------------------------------------------------------------------
    async def _extend_forever(self) -> None:
        while True:
            await asyncio.sleep(self.visibility / 3)
            receipts = [held.receipt for held in self._in_progress.values()]
            if receipts:
                await self._set_visibility(receipts, self.visibility)

    async def _set_visibility(self, receipts: list[str], seconds: int) -> None:
        for start in range(0, len(receipts), BATCH):
            entries = [{"Id": str(n), "ReceiptHandle": receipt, "VisibilityTimeout": seconds}
                       for n, receipt in enumerate(receipts[start:start + BATCH])]
            try:
                answer = await self._client.change_message_visibility_batch(QueueUrl=self.url,
                                                                            Entries=entries)
            except Exception as exc:
                self._trouble("change_visibility", exc)
                return
            failed = answer.get("Failed", [])
            if failed:
                log.warning("sqs_visibility_not_changed", messages=len(failed),
                            code=failed[0].get("Code"), seconds=seconds)

    def _trouble(self, action: str, exc: Exception) -> None:
        """Log once per outage; /health shows the last error until a receive succeeds."""
        error = _describe(exc)
        if self.last_error is None:
            log.error("sqs_error", action=action, error=error,
                      exc_info=not isinstance(exc, ClientError | OSError))
        self.reachable, self.last_error = False, error


def open_sqs(settings: Settings) -> AbstractAsyncContextManager[Any]:
    """An SQS client for the queue; region and keys fall back to the S3 ones."""
    s = settings
    key = s.sqs_access_key or s.s3_access_key
    secret = s.sqs_secret_key or s.s3_secret_key
    config = AioConfig(connect_timeout=s.s3_connect_timeout, read_timeout=WAIT_SECONDS + 10,
                       retries={"total_max_attempts": 3, "mode": "standard"})
    context: AbstractAsyncContextManager[Any] = get_session().create_client(
        "sqs", endpoint_url=s.sqs_endpoint, region_name=s.sqs_region or s.s3_region,
        aws_access_key_id=key.get_secret_value(), aws_secret_access_key=secret.get_secret_value(),
        config=config)
    return context


def _version(ref: ObjectRef) -> Version:
    return (ref.key, ref.etag)


def _unwrap(body: str) -> bytes:
    """The S3 notification inside an SNS envelope (S3 → SNS → SQS without raw delivery)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.encode()  # EventIntake.refs says what is wrong with it
    if isinstance(data, dict) and data.get("Type") == "Notification" and isinstance(data.get("Message"), str):
        return str(data["Message"]).encode()
    return body.encode()


def _describe(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', 'error')}: {error.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"

"""Events: S3 notifications pushed over HTTP (`POST /events`), as hints the poll backs up.

MinIO webhooks, Ceph RGW HTTP push endpoints, VK Cloud webhooks and Yandex-style function
relays all send AWS-style bodies: `{"Records": [{"eventName", "eventSource",
"s3": {"bucket": {"name"}, "object": {"key", "eTag", "size", "sequencer"}}}]}`. A record
for a new object in our bucket under the input prefix is offered to the work queue at
once, so a document starts within a second of its upload however long the poll interval;
anything a notification misses, the next poll still finds.

AWS and MinIO URL-encode object keys in events (spaces as `+`); Ceph RGW sends them as
they are, so keys are decoded only for senders known to encode them. Deliveries are at
least once and may come out of order: a key + ETag already offered is not offered again,
and a record older (by S3's `sequencer`) than one already seen for its key is dropped.

The SQS source (sqs.py) reads the same bodies from a queue through `EventIntake.refs`.
"""

from __future__ import annotations

import hmac
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus

from watcher.bucket.names import Names
from watcher.bucket.storage import ObjectRef, clean_etag
from watcher.core.logs import get_logger

log = get_logger("watcher.intake.events")

# Senders that URL-encode object keys in their records (eventSource).
ENCODING_SOURCES = {"aws:s3", "minio:s3"}
_REMEMBERED = 10_000  # keys whose last sequencer and ETag are kept, most recent first


class BadEvent(ValueError):
    pass


@dataclass(frozen=True)
class Intake:
    accepted: int
    ignored: int


@dataclass(frozen=True)
class Found:
    """What one notification body names."""

    refs: list[ObjectRef]  # new versions of our documents, to offer
    polled: int  # records without an ETag, for which a poll was asked
    ignored: int  # anything else: other buckets or prefixes, removals, repeats, stale

    @property
    def accepted(self) -> int:
        return len(self.refs) + self.polled


class EventIntake:
    """Turns notification bodies into work offered to the queue; no I/O of its own."""

    def __init__(self, bucket: str, names: Names, offer: Callable[[ObjectRef], bool],
                 poke: Callable[[], None]) -> None:
        self.bucket = bucket
        self.names = names
        self.offer = offer
        self.poke = poke
        self._seen: OrderedDict[str, tuple[str, str]] = OrderedDict()  # key -> (sequencer, etag)

    @staticmethod
    def authorised(header: str | None, token: str) -> bool:
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def take(self, body: bytes) -> Intake:
        found = self.refs(body)
        for ref in found.refs:
            offered = self.offer(ref)
            log.info("event_received", key=ref.key, etag=ref.etag, offered=offered)
        return Intake(found.accepted, found.ignored)

    def refs(self, body: bytes) -> Found:
        """The new versions of our documents that a notification body names (no offers made);
        records without an ETag ask for a poll instead. Raises BadEvent for a body that is
        not a notification."""
        refs: list[ObjectRef] = []
        polled = ignored = 0
        for record in _records(body):
            ref = self._version(record)
            if ref is None:
                ignored += 1
            elif not ref.etag:
                self.poke()  # nothing to claim by: let a listing find it now
                polled += 1
            else:
                refs.append(ref)
        return Found(refs, polled, ignored)

    def forget(self, ref: ObjectRef) -> None:
        """Take `ref` as new when it is named again (its run is to be retried)."""
        last = self._seen.get(ref.key)
        if last is not None and last[1] == ref.etag:
            del self._seen[ref.key]

    def _version(self, record: Any) -> ObjectRef | None:
        """The version a record names when it is a new one of our documents (its etag is
        empty when the sender gave none); None for anything else."""
        try:
            s3 = record["s3"]
            name = str(record.get("eventName", ""))
            bucket = str(s3["bucket"]["name"])
            obj = s3["object"]
            raw_key = str(obj["key"])
        except (KeyError, TypeError, AttributeError):
            return None
        if "ObjectCreated" not in name or bucket != self.bucket:
            return None  # removals, test events, other buckets: the poll's business
        source = str(record.get("eventSource", ""))
        key = unquote_plus(raw_key) if source in ENCODING_SOURCES else raw_key
        if not self.names.is_document_key(key):
            return None
        etag = clean_etag(str(obj.get("eTag") or obj.get("etag") or ""))
        sequencer = str(obj.get("sequencer") or "")
        if not self._newer(key, sequencer, etag):
            return None
        return ObjectRef(bucket=bucket, key=key, etag=etag, size=_size(obj.get("size")),
                         last_modified=_time(record.get("eventTime")))

    def _newer(self, key: str, sequencer: str, etag: str) -> bool:
        """False for a delivery seen before, or older than one seen for the key."""
        last = self._seen.get(key)
        if last is not None:
            last_sequencer, last_etag = last
            if etag and etag == last_etag:
                return False
            if sequencer and last_sequencer and _order(sequencer) <= _order(last_sequencer):
                return False
        self._seen[key] = (sequencer or (last[0] if last else ""), etag)
        self._seen.move_to_end(key)
        while len(self._seen) > _REMEMBERED:
            self._seen.popitem(last=False)
        return True


def _records(body: bytes) -> list[Any]:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadEvent(f"the body is not JSON: {exc}") from None
    if isinstance(data, dict) and data.get("Event") == "s3:TestEvent":
        return []  # AWS checks the destination with this when it is set up
    records = data.get("Records") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise BadEvent("expected an AWS-style body with a 'Records' list")
    return records


def _size(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _order(sequencer: str) -> tuple[int, str]:
    # S3 sequencers are hex strings of varying length; compare them as numbers.
    return (len(sequencer.lstrip("0")), sequencer.lstrip("0").upper())


def _time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None

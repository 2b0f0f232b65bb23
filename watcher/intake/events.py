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
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus

from watcher.bucket.names import Names
from watcher.core.logs import get_logger
from watcher.core.refs import ObjectRef, clean_etag

log = get_logger("watcher.intake.events")

# Senders that URL-encode object keys in their records (eventSource).
ENCODING_SOURCES = {"aws:s3", "minio:s3"}
_REMEMBERED = 10_000  # keys whose last sequencer and ETag are kept, most recent first
MAX_REFUSALS_LISTED = 20  # reasons returned in one answer


class BadEvent(ValueError):
    pass


class Refused(ValueError):
    """A record for our bucket names a key no S3 object can have (not UTF-8, a NUL)."""


@dataclass(frozen=True)
class Intake:
    accepted: int
    ignored: int
    refused: list[str] = field(default_factory=list)  # why, one line per refused record


@dataclass(frozen=True)
class Found:
    """What one notification body names."""

    refs: list[ObjectRef]  # new versions of our documents, to offer
    polled: int  # records without an ETag, for which a poll was asked
    ignored: int  # anything else: other buckets or prefixes, removals, repeats, stale
    refused: list[str] = field(default_factory=list)

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
        for reason in found.refused:
            log.warning("event_refused", reason=reason)
        return Intake(found.accepted, found.ignored, found.refused)

    def refs(self, body: bytes) -> Found:
        """The new versions of our documents that a notification body names (no offers made);
        records without an ETag ask for a poll instead. Raises BadEvent for a body that is
        not a notification."""
        refs: list[ObjectRef] = []
        refused: list[str] = []
        polled = ignored = 0
        for record in _records(body):
            try:
                ref = self._version(record)
            except Refused as exc:
                refused.append(str(exc))
                continue
            if ref is None:
                ignored += 1
            elif not ref.etag:
                self.poke()  # nothing to claim by: let a listing find it now
                polled += 1
            else:
                refs.append(ref)
        return Found(refs, polled, ignored, refused[:MAX_REFUSALS_LISTED])

    def forget(self, ref: ObjectRef) -> None:
        """Take `ref` as new when it is named again (its run is to be retried)."""
        last = self._seen.get(ref.key)
        if last is not None and last[1] == ref.etag:
            del self._seen[ref.key]

    def _version(self, record: Any) -> ObjectRef | None:
        """The version a record names when it is a new one of our documents (its etag is
        empty when the sender gave none); None for anything else. Everything but the key
        and the ETag is a hint: the size and time only order and display work, and what
        the document is is decided from the bytes fetched with If-Match on that ETag."""
        try:
            s3 = record["s3"]
            name = str(record.get("eventName", ""))
            bucket = str(s3["bucket"]["name"])
            obj = s3["object"]
            raw_key = obj["key"]
        except (KeyError, TypeError, AttributeError):
            return None
        if "ObjectCreated" not in name or bucket != self.bucket or not isinstance(raw_key, str):
            return None  # removals, test events, other buckets: the poll's business
        source = str(record.get("eventSource", ""))
        key = _decoded(raw_key) if source in ENCODING_SOURCES else raw_key
        if "\x00" in key or any(0xD800 <= ord(c) <= 0xDFFF for c in key):
            raise Refused(f"a record names a key that is not valid UTF-8 or holds NUL: {key[:80]!r}")
        if not self.names.is_document_key(key):
            return None
        etag = clean_etag(str(obj.get("eTag") or obj.get("etag") or ""))
        sequencer = str(obj.get("sequencer") or "")
        ref = ObjectRef(bucket=bucket, key=key, etag=etag, size=_size(obj.get("size")),
                        last_modified=_time(record.get("eventTime")))
        # Remembered only once the whole record was understood: a malformed copy must not
        # make a valid one look like a repeat.
        if not self._newer(key, sequencer, etag):
            return None
        return ref

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
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, 4,300-digit numbers
        raise BadEvent(f"the body is not JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise BadEvent("the body is not a notification: JSON nested too deeply") from None
    if isinstance(data, dict) and data.get("Event") == "s3:TestEvent":
        return []  # AWS checks the destination with this when it is set up
    records = data.get("Records") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise BadEvent("expected an AWS-style body with a 'Records' list")
    return records


def _size(value: Any) -> int:
    """A sender's size, as a hint: anything that is not a plain byte count reads as 0."""
    try:
        size = int(value or 0)
    except (TypeError, ValueError, OverflowError):  # junk, NaN, 1e400
        return 0
    return size if 0 <= size < 1 << 63 else 0


def _decoded(raw_key: str) -> str:
    """A URL-encoded key (AWS, MinIO) as the object's name; Refused when the bytes it
    encodes are not UTF-8."""
    try:
        return unquote_plus(raw_key, errors="strict")
    except UnicodeDecodeError:
        raise Refused(f"a record names a key that is not valid UTF-8: {raw_key[:80]!r}") from None


def _order(sequencer: str) -> tuple[int, str]:
    # S3 sequencers are hex strings of varying length; compare them as numbers.
    return (len(sequencer.lstrip("0")), sequencer.lstrip("0").upper())


def _time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        return None

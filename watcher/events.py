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

from watcher.layout import Layout
from watcher.logs import get_logger
from watcher.storage import ObjectRef, clean_etag

log = get_logger("watcher.events")

# Senders that URL-encode object keys in their records (eventSource).
ENCODING_SOURCES = {"aws:s3", "minio:s3"}
_REMEMBERED = 10_000  # keys whose last sequencer and ETag are kept, most recent first


class BadEvent(ValueError):
    pass


@dataclass(frozen=True)
class Intake:
    accepted: int
    ignored: int


class EventIntake:
    """Turns notification bodies into work offered to the queue; no I/O of its own."""

    def __init__(self, bucket: str, layout: Layout, offer: Callable[[ObjectRef], bool],
                 poke: Callable[[], None]) -> None:
        self.bucket = bucket
        self.layout = layout
        self.offer = offer
        self.poke = poke
        self._seen: OrderedDict[str, tuple[str, str]] = OrderedDict()  # key -> (sequencer, etag)

    @staticmethod
    def authorised(header: str | None, token: str) -> bool:
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def take(self, body: bytes) -> Intake:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadEvent(f"the body is not JSON: {exc}") from None
        if isinstance(data, dict) and data.get("Event") == "s3:TestEvent":
            return Intake(0, 0)  # AWS checks the destination with this when it is set up
        records = data.get("Records") if isinstance(data, dict) else None
        if not isinstance(records, list):
            raise BadEvent("expected an AWS-style body with a 'Records' list")
        accepted = sum(self._record(r) for r in records)
        return Intake(accepted, len(records) - accepted)

    def _record(self, record: Any) -> bool:
        try:
            s3 = record["s3"]
            name = str(record.get("eventName", ""))
            bucket = str(s3["bucket"]["name"])
            obj = s3["object"]
            raw_key = str(obj["key"])
        except (KeyError, TypeError):
            return False
        if "ObjectCreated" not in name or bucket != self.bucket:
            return False  # removals, test events, other buckets: the poll's business
        source = str(record.get("eventSource", ""))
        key = unquote_plus(raw_key) if source in ENCODING_SOURCES else raw_key
        if not self.layout.is_document_key(key):
            return False
        etag = clean_etag(str(obj.get("eTag") or obj.get("etag") or ""))
        sequencer = str(obj.get("sequencer") or "")
        if not self._newer(key, sequencer, etag):
            return False
        if not etag:
            self.poke()  # nothing to claim by: let a listing find it now
            return True
        ref = ObjectRef(bucket=bucket, key=key, etag=etag, size=int(obj.get("size") or 0),
                        last_modified=_time(record.get("eventTime")))
        offered = self.offer(ref)
        log.info("event_received", key=key, etag=etag, offered=offered, source=source or None)
        return True

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


def _order(sequencer: str) -> tuple[int, str]:
    # S3 sequencers are hex strings of varying length; compare them as numbers.
    return (len(sequencer.lstrip("0")), sequencer.lstrip("0").upper())


def _time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None

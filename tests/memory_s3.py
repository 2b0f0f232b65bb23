"""An in-memory S3 with S3's semantics for what the watcher uses, and faults on demand.

It speaks the subset of the aiobotocore client API that `watcher.bucket.storage.Storage`
calls (put/get/head/delete/copy object, ListObjectsV2, head bucket), raising botocore's
own `ClientError` shapes, so the real `Storage` (its retries, its reading of 304/404/412)
runs on top of it. What it keeps to, as S3 does:

- ETags: the MD5 of the body for a PUT; `<md5 of the parts' MD5s>-<parts>` for a
  multipart upload (`MemoryS3.put(..., parts=N)`), so no code may take an ETag for a hash.
- Conditions: `If-None-Match: *` and `If-Match` on PUT (412; 404 for If-Match on a
  missing key, as AWS answers), `If-Match`/`If-None-Match` on GET (412/304), `If-Match`
  on DELETE (412; 404 when missing), `CopySourceIfMatch` on copy (412).
- Listings: strongly consistent, lexicographic, paginated with continuation tokens.

Faults (`Faults`), drawn from one seeded `random.Random` so that a run replays exactly:
5xx and throttling before a request is applied, a response lost *after* a write was
applied (the client sees a timeout, the bucket has changed), a GET body cut mid-stream,
and latency before and after each request (virtual time under the simulation's loop).

Not a mock of the watcher: it knows nothing of leases or results. Every request is logged
with the actor that sent it, which is what the simulation's invariants read.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from botocore.exceptions import ClientError, ReadTimeoutError


@dataclass
class Faults:
    """Chances per request; all zero by default (a well-behaved store)."""

    server_error: float = 0.0  # 500/503 before the request is applied
    throttle: float = 0.0  # 503 SlowDown before the request is applied
    lost_response: float = 0.0  # a write applied, then its response lost (a timeout)
    cut_body: float = 0.0  # a GET body that stops half-way
    latency: float = 0.0  # mean seconds before and after each request (exponential)
    # Conditions the store ignores, as some S3 services do: "delete", "copy", "put".
    ignored_conditions: frozenset[str] = frozenset()


@dataclass
class StoredObject:
    body: bytes
    etag: str
    last_modified: datetime
    content_type: str = "application/octet-stream"
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """One request as the bucket saw it; `applied` when it changed the bucket."""

    actor: str
    op: str
    key: str
    etag: str | None = None  # the ETag written, or the one a delete/copy removed or read
    applied: bool = False
    note: str = ""


def _error(status: int, code: str, op: str, message: str = "") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message or code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def _clean(etag: str | None) -> str:
    return (etag or "").strip().strip('"')


class _Body:
    """A GET body: `read()`, `iter_chunks()`, and `async with`, as aiobotocore gives."""

    def __init__(self, data: bytes, cut_at: int | None) -> None:
        self._data = data
        self._cut_at = cut_at

    async def __aenter__(self) -> _Body:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def close(self) -> None:
        self._data = b""

    async def read(self) -> bytes:
        chunks = [chunk async for chunk in self.iter_chunks(1 << 16)]
        return b"".join(chunks)

    async def iter_chunks(self, size: int) -> AsyncIterator[bytes]:
        end = len(self._data) if self._cut_at is None else self._cut_at
        for start in range(0, end, max(1, size)):
            yield self._data[start:min(start + size, end)]
            await asyncio.sleep(0)
        if self._cut_at is not None:
            raise aiohttp.ClientPayloadError("Response payload is not completed")


class MemoryS3:
    """One bucket's worth of objects (any bucket name is accepted)."""

    def __init__(self, rng: random.Random | None = None, faults: Faults | None = None,
                 now: Callable[[], float] | None = None) -> None:
        self.rng = rng or random.Random(0)
        self.faults = faults or Faults()
        self.objects: dict[str, StoredObject] = {}
        self.requests: list[Request] = []
        self._now = now or (lambda: datetime.now(UTC).timestamp())
        # Actors for whom no faults are drawn (any more).
        self.reliable: set[str] = set()
        # Told of every request that changed the bucket, as it is applied.
        self.watch: Callable[[Request], None] = lambda request: None

    def client(self, actor: str) -> MemoryClient:
        return MemoryClient(self, actor)

    # --- direct access (producers, checks) --------------------------------------------
    def put(self, key: str, body: bytes, actor: str = "producer", parts: int = 0,
            metadata: dict[str, str] | None = None) -> str:
        """An upload as a producer makes it: no conditions, no faults; returns the ETag."""
        etag = _multipart_etag(body, parts) if parts > 1 else hashlib.md5(body).hexdigest()
        self._store(key, body, etag, "application/octet-stream", metadata or {})
        self.record(Request(actor, "put", key, etag, True))
        return etag

    def remove(self, key: str, actor: str = "producer") -> str | None:
        gone = self.objects.pop(key, None)
        self.record(Request(actor, "delete", key, gone.etag if gone else None, gone is not None))
        return gone.etag if gone else None

    def record(self, request: Request) -> None:
        self.requests.append(request)
        if request.applied:
            self.watch(request)

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))

    # --- internals ---------------------------------------------------------------------
    def _store(self, key: str, body: bytes, etag: str, content_type: str,
               metadata: dict[str, str]) -> None:
        stamp = datetime.fromtimestamp(self._now(), UTC).replace(microsecond=0)
        self.objects[key] = StoredObject(body, etag, stamp, content_type, dict(metadata))

    def _chance(self, actor: str, p: float) -> bool:
        return actor not in self.reliable and p > 0 and self.rng.random() < p

    async def _latency(self, actor: str) -> None:
        if self.faults.latency > 0:
            await asyncio.sleep(self.rng.expovariate(1.0 / self.faults.latency))
        else:
            await asyncio.sleep(0)

    async def before(self, actor: str, op: str, key: str) -> None:
        await self._latency(actor)
        if self._chance(actor, self.faults.server_error):
            self.requests.append(Request(actor, op, key, note="500"))
            raise _error(500, "InternalError", op)
        if self._chance(actor, self.faults.throttle):
            self.requests.append(Request(actor, op, key, note="503 SlowDown"))
            raise _error(503, "SlowDown", op)

    async def after_write(self, actor: str, op: str, key: str) -> None:
        if self._chance(actor, self.faults.lost_response):
            self.requests.append(Request(actor, op, key, note="response lost"))
            raise ReadTimeoutError(endpoint_url=f"memory://{key}")
        await self._latency(actor)


def _multipart_etag(body: bytes, parts: int) -> str:
    size = max(1, -(-len(body) // parts))
    digests = b"".join(hashlib.md5(body[i:i + size]).digest() for i in range(0, max(len(body), 1), size))
    return f"{hashlib.md5(digests).hexdigest()}-{parts}"


class MemoryClient:
    """The aiobotocore S3 client API, as far as the watcher uses it, for one actor."""

    def __init__(self, store: MemoryS3, actor: str) -> None:
        self.store = store
        self.actor = actor

    def _log(self, op: str, key: str, etag: str | None = None, applied: bool = False, note: str = "") -> None:
        self.store.record(Request(self.actor, op, key, etag, applied, note))

    async def put_object(self, *, Bucket: str, Key: str, Body: bytes, ContentType: str = "",
                         Metadata: dict[str, str] | None = None, IfNoneMatch: str | None = None,
                         IfMatch: str | None = None) -> dict[str, Any]:
        s = self.store
        await s.before(self.actor, "put", Key)
        current = s.objects.get(Key)
        conditional = "put" not in s.faults.ignored_conditions
        if conditional and IfNoneMatch == "*" and current is not None:
            self._log("put", Key, note="412 exists")
            raise _error(412, "PreconditionFailed", "PutObject")
        if conditional and IfMatch is not None:
            if current is None:
                self._log("put", Key, note="404 if-match on missing")
                raise _error(404, "NoSuchKey", "PutObject")
            if current.etag != _clean(IfMatch):
                self._log("put", Key, note="412 etag")
                raise _error(412, "PreconditionFailed", "PutObject")
        body = bytes(Body)
        etag = hashlib.md5(body).hexdigest()
        s._store(Key, body, etag, ContentType, Metadata or {})
        self._log("put", Key, etag, True)
        await s.after_write(self.actor, "put", Key)
        return {"ETag": f'"{etag}"'}

    async def get_object(self, *, Bucket: str, Key: str, IfMatch: str | None = None,
                         IfNoneMatch: str | None = None) -> dict[str, Any]:
        s = self.store
        await s.before(self.actor, "get", Key)
        current = s.objects.get(Key)
        if current is None:
            self._log("get", Key, note="404")
            raise _error(404, "NoSuchKey", "GetObject")
        if IfMatch is not None and current.etag != _clean(IfMatch):
            self._log("get", Key, note="412")
            raise _error(412, "PreconditionFailed", "GetObject")
        if IfNoneMatch is not None and current.etag == _clean(IfNoneMatch):
            self._log("get", Key, note="304")
            raise _error(304, "304", "GetObject", "Not Modified")
        cut = None
        if len(current.body) > 1 and s._chance(self.actor, s.faults.cut_body):
            cut = s.rng.randrange(1, len(current.body))
        self._log("get", Key, current.etag, note="cut" if cut is not None else "")
        await s._latency(self.actor)
        return {"Body": _Body(current.body, cut), "ETag": f'"{current.etag}"',
                "ContentLength": len(current.body), "Metadata": dict(current.metadata),
                "LastModified": current.last_modified, "ContentType": current.content_type}

    async def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        s = self.store
        await s.before(self.actor, "head", Key)
        current = s.objects.get(Key)
        if current is None:
            self._log("head", Key, note="404")
            raise _error(404, "404", "HeadObject", "Not Found")
        self._log("head", Key, current.etag)
        await s._latency(self.actor)
        return {"ETag": f'"{current.etag}"', "ContentLength": len(current.body),
                "Metadata": dict(current.metadata), "LastModified": current.last_modified,
                "ContentType": current.content_type}

    async def delete_object(self, *, Bucket: str, Key: str, IfMatch: str | None = None) -> dict[str, Any]:
        s = self.store
        await s.before(self.actor, "delete", Key)
        current = s.objects.get(Key)
        if IfMatch is not None and "delete" not in s.faults.ignored_conditions:
            if current is None:
                self._log("delete", Key, note="404 if-match on missing")
                raise _error(404, "NoSuchKey", "DeleteObject")
            if current.etag != _clean(IfMatch):
                self._log("delete", Key, note="412")
                raise _error(412, "PreconditionFailed", "DeleteObject")
        gone = s.objects.pop(Key, None)
        self._log("delete", Key, gone.etag if gone else None, gone is not None)
        await s.after_write(self.actor, "delete", Key)
        return {}

    async def copy_object(self, *, Bucket: str, Key: str, CopySource: dict[str, str],
                          CopySourceIfMatch: str | None = None,
                          MetadataDirective: str | None = None) -> dict[str, Any]:
        s = self.store
        await s.before(self.actor, "copy", Key)
        source = s.objects.get(CopySource["Key"])
        if source is None:
            self._log("copy", CopySource["Key"], note="404")
            raise _error(404, "NoSuchKey", "CopyObject")
        if (CopySourceIfMatch is not None and "copy" not in s.faults.ignored_conditions
                and source.etag != _clean(CopySourceIfMatch)):
            self._log("copy", CopySource["Key"], note="412")
            raise _error(412, "PreconditionFailed", "CopyObject")
        s._store(Key, source.body, source.etag, source.content_type, source.metadata)
        self._log("copy", CopySource["Key"], source.etag, True, note=f"to {Key}")
        await s.after_write(self.actor, "copy", Key)
        return {"CopyObjectResult": {"ETag": f'"{source.etag}"'}}

    async def list_objects_v2(self, *, Bucket: str, Prefix: str = "", MaxKeys: int = 1000,
                              ContinuationToken: str | None = None) -> dict[str, Any]:
        s = self.store
        await s.before(self.actor, "list", Prefix)
        keys = [k for k in sorted(s.objects) if k.startswith(Prefix)
                and (ContinuationToken is None or k > ContinuationToken)]
        page, rest = keys[:MaxKeys], keys[MaxKeys:]
        self._log("list", Prefix, note=f"{len(page)} keys")
        await s._latency(self.actor)
        answer: dict[str, Any] = {
            "Contents": [{"Key": k, "ETag": f'"{s.objects[k].etag}"', "Size": len(s.objects[k].body),
                          "LastModified": s.objects[k].last_modified} for k in page],
            "IsTruncated": bool(rest),
        }
        if rest:
            answer["NextContinuationToken"] = page[-1]
        return answer

    async def head_bucket(self, *, Bucket: str) -> dict[str, Any]:
        await self.store.before(self.actor, "head_bucket", "")
        return {}

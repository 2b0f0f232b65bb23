"""The S3 client: aiobotocore configured for third-party S3 providers, with retries.

Every call goes through `Storage`, which retries transient failures (connection errors,
timeouts, 5xx, throttling) with exponential backoff and jitter and turns exhaustion into
`StorageUnavailable`, so callers only ever see "try again later" or a real answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any, Protocol, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from watcher.core.logs import get_logger
from watcher.core.refs import ObjectRef, clean_etag
from watcher.core.settings import Settings

log = get_logger("watcher.bucket.storage")
T = TypeVar("T")

_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                   "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"}


class StorageUnavailable(Exception):
    """S3 did not answer usefully after retries; the caller should try again later."""


class PreconditionFailed(Exception):
    """A conditional request lost (If-Match / If-None-Match)."""


class KeyRefused(Exception):
    """The store refuses an object name (too long, invalid): retrying cannot help."""


_KEY_REFUSED_CODES = {"KeyTooLongError", "InvalidObjectName", "InvalidKey", "InvalidURI"}


class Unchanged(Enum):
    UNCHANGED = "unchanged"


UNCHANGED = Unchanged.UNCHANGED


class ListPace:
    """Spaces list requests at least 1/rate apart, so that a poll of a large bucket takes
    longer instead of exceeding the provider's request limit."""

    def __init__(self, per_second: float | None) -> None:
        self.gap = 1.0 / per_second if per_second else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self.gap:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._next)
        self._next = start + self.gap
        if start > now:
            await asyncio.sleep(start - now)


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        return http_status(exc) >= 500 or error_code(exc) in _THROTTLE_CODES
    return isinstance(
        exc,
        BotoConnectionError
        | HTTPClientError
        | ReadTimeoutError
        | aiohttp.ClientError
        | TimeoutError
        | ConnectionError,
    )


_REFUSED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
                  "InvalidToken", "ExpiredToken", "AllAccessDisabled", "AuthorizationHeaderMalformed"}


def is_refused(exc: ClientError) -> bool:
    return http_status(exc) in (401, 403) or error_code(exc) in _REFUSED_CODES


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and (
        http_status(exc) == 404 or error_code(exc) in {"404", "NoSuchKey", "NotFound"}
    )


def is_precondition_failed(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and (
        http_status(exc) in (409, 412)
        or error_code(exc) in {"PreconditionFailed", "ConditionalRequestConflict"}
    )


def client_config(settings: Settings) -> AioConfig:
    return AioConfig(
        region_name=settings.s3_region,
        signature_version="s3v4",
        connect_timeout=settings.s3_connect_timeout,
        read_timeout=settings.s3_read_timeout,
        max_pool_connections=settings.s3_max_pool,
        # Retries are ours (tenacity), so botocore must not multiply them.
        retries={"total_max_attempts": 1, "mode": "standard"},
        s3={"addressing_style": settings.s3_addressing.value},
        # Third-party S3 (Cloud.ru among them) rejects the CRC32 trailers of botocore >= 1.36.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


@dataclass(frozen=True)
class Conditions:
    """Which conditional requests the store enforces (`Storage.probe_conditions`).

    Leases need `put` (If-None-Match / If-Match on PUT); without it only key-hash shards
    keep replicas apart. `delete` (If-Match on DELETE) and `copy` (CopySourceIfMatch)
    make removing a lease or settling a source touch only the version meant; without
    them the same is done by a HEAD and a compare first, which leaves a moment between
    the two in which a new upload could slip in.
    """

    put: bool = True
    delete: bool = True
    copy: bool = True

    def ignored(self) -> list[str]:
        names = {"put": "If-None-Match/If-Match on PUT", "delete": "If-Match on DELETE",
                 "copy": "CopySourceIfMatch on copy"}
        return [names[name] for name in ("put", "delete", "copy") if not getattr(self, name)]


class ObjectTooLarge(Exception):
    """The object is larger than the caller accepts; its body was not read (or not all)."""

    def __init__(self, size: int, limit: int, exact: bool) -> None:
        super().__init__(f"{'' if exact else 'more than '}{size} bytes, over the limit of {limit}")
        self.size = size  # the announced size, or what had arrived when reading stopped
        self.limit = limit
        self.exact = exact


class DownloadSink(Protocol):
    """Where a download's bytes go; `restart` before each attempt, so that a retried GET
    never appends to what an attempt cut off half-way wrote."""

    def restart(self) -> None: ...

    def write(self, chunk: bytes) -> None: ...


@dataclass(frozen=True)
class Downloaded:
    size: int
    etag: str


class Storage:
    """Thin, retrying wrapper over one aiobotocore S3 client for one bucket."""

    # botocore parses a listing page on the event loop: 1,000 keys hold it ~90 ms on a small
    # box, 250 keys ~20 ms (bench/flood.py); /health must not wait behind that.
    def __init__(self, client: Any, bucket: str, max_attempts: int, list_page_size: int = 250) -> None:
        self.client = client
        self.bucket = bucket
        self.max_attempts = max_attempts
        self.list_page_size = list_page_size
        # What the store enforces; the daemon probes it at start (probe_conditions).
        self.conditions = Conditions()
        # Every request sent, by operation (retries included): the daemon counts them.
        self.on_request: Callable[[str], None] = lambda op: None
        self._list_pace = ListPace(None)

    def pace_listing(self, per_second: float | None) -> None:
        """Send list requests at most `per_second` (the listing budget); None: unpaced."""
        self._list_pace = ListPace(per_second)

    async def _call(self, op: str, fn: Callable[[int], Awaitable[T]]) -> T:
        """`fn(attempt)` with retries of transient failures; `attempt` counts from 1."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_random_exponential(multiplier=0.2, max=5.0),
            retry=retry_if_exception(is_transient),
            reraise=False,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if op == "list":
                        await self._list_pace.wait()
                    self.on_request(op)
                    return await fn(attempt.retry_state.attempt_number)
        except ClientError as exc:
            if error_code(exc) in _KEY_REFUSED_CODES:
                raise KeyRefused(f"S3 {op} refused the object name ({error_code(exc)})") from exc
            if is_refused(exc):
                # Wrong keys, bucket or permissions: an operator's problem, not a document's.
                raise StorageUnavailable(
                    f"S3 {op} refused ({error_code(exc) or http_status(exc)}): check "
                    "CLOUDRU_S3_ACCESS_KEY, CLOUDRU_S3_SECRET_KEY, CLOUDRU_S3_BUCKET and the "
                    "key's permissions"
                ) from exc
            raise
        except RetryError as exc:
            cause = exc.last_attempt.exception()
            raise StorageUnavailable(f"S3 {op} failed: {type(cause).__name__}: {cause}") from cause
        raise AssertionError("unreachable")  # pragma: no cover

    # --- listing ---------------------------------------------------------------------
    async def list_objects(self, prefix: str) -> AsyncIterator[ObjectRef]:
        """All objects under `prefix`, page by page (ListObjectsV2)."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": self.list_page_size}
            if token:
                kwargs["ContinuationToken"] = token
            page: dict[str, Any] = await self._call(
                "list", partial(_ignore_attempt, self.client.list_objects_v2, kwargs))
            for item in page.get("Contents", []):
                yield ObjectRef(
                    bucket=self.bucket,
                    key=item["Key"],
                    etag=clean_etag(item.get("ETag", "")),
                    size=int(item.get("Size", 0)),
                    last_modified=item.get("LastModified"),
                )
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token:
                return

    # --- reading -----------------------------------------------------------------------
    async def head(self, key: str) -> dict[str, Any] | None:
        async def op(_attempt: int) -> dict[str, Any] | None:
            try:
                return dict(await self.client.head_object(Bucket=self.bucket, Key=key))
            except ClientError as exc:
                if is_not_found(exc):
                    return None
                raise

        return await self._call("head", op)

    async def etag_of(self, key: str) -> str | None:
        """The current ETag of `key`, or None when there is no such object."""
        head = await self.head(key)
        return clean_etag(head.get("ETag", "")) if head else None

    async def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        """Body and ETag of a small object, or None when it does not exist."""
        got = await self.get_if_changed(key, None)
        assert got is not UNCHANGED  # nothing to compare with: never a 304
        return got

    async def get_if_changed(self, key: str, etag: str | None) -> tuple[bytes, str] | Unchanged | None:
        """Like get_bytes, but `UNCHANGED` (a 304, no body sent) while the ETag is `etag`."""

        async def op(_attempt: int) -> tuple[bytes, str] | Unchanged | None:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
            if etag:
                kwargs["IfNoneMatch"] = f'"{etag}"'
            try:
                resp = await self.client.get_object(**kwargs)
            except ClientError as exc:
                if is_not_found(exc):
                    return None
                if http_status(exc) == 304 or error_code(exc) == "304":
                    return UNCHANGED
                raise
            async with resp["Body"] as body:
                data = await body.read()
            return data, clean_etag(resp.get("ETag", ""))

        return await self._call("get", op)

    async def download(self, ref: ObjectRef, sink: DownloadSink, max_bytes: int) -> Downloaded:
        """Stream exactly the version `ref` names (If-Match on its ETag) into `sink`.

        Every attempt starts the sink over, so bytes and hashes are those of one whole
        response. A body over `max_bytes` is refused from the response's Content-Length
        before it is read, or as soon as more than that arrived (ObjectTooLarge). Raises
        PreconditionFailed when the object changed since `ref` was seen and
        FileNotFoundError when it is gone: both mean "drop it, discovery will see the
        truth". The listing's or event's `ref.size` is not consulted.
        """

        async def op(_attempt: int) -> Downloaded:
            sink.restart()
            try:
                resp = await self.client.get_object(
                    Bucket=self.bucket, Key=ref.key, IfMatch=f'"{ref.etag}"'
                )
            except ClientError as exc:
                if is_not_found(exc):
                    raise FileNotFoundError(ref.key) from exc
                if is_precondition_failed(exc):
                    raise PreconditionFailed(ref.key) from exc
                raise
            announced = resp.get("ContentLength")
            if isinstance(announced, int) and announced > max_bytes:
                resp["Body"].close()
                raise ObjectTooLarge(announced, max_bytes, exact=True)
            written = 0
            async with resp["Body"] as body:
                async for chunk in body.iter_chunks(1024 * 1024):
                    written += len(chunk)
                    if written > max_bytes:
                        raise ObjectTooLarge(max_bytes, max_bytes, exact=False)
                    sink.write(chunk)
            if isinstance(announced, int) and written != announced:
                # A body that ended early without an error from the HTTP layer.
                raise ConnectionError(f"got {written} of {announced} bytes of {ref.key}")
            return Downloaded(written, clean_etag(resp.get("ETag", "")) or ref.etag)

        return await self._call("get", op)

    # --- writing -----------------------------------------------------------------------
    async def put(
        self,
        key: str,
        body: bytes,
        content_type: str,
        metadata: dict[str, str] | None = None,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """PUT an object; returns its ETag. Conditional variants raise PreconditionFailed.

        A conditional PUT retried after an attempt whose answer was lost (a timeout: the
        store may have applied it) and then refused is read back: when the object holds
        exactly our bytes, the write was ours, not a lost race.
        """
        conditional = self.conditions.put and (if_none_match or if_match is not None)
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": body,
            "ContentType": content_type,
            "Metadata": metadata or {},
        }
        if conditional and if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if conditional and if_match is not None:
            kwargs["IfMatch"] = f'"{if_match}"'

        async def op(attempt: int) -> str:
            try:
                resp = await self.client.put_object(**kwargs)
            except ClientError as exc:
                refused = is_precondition_failed(exc) or (if_match is not None and is_not_found(exc))
                if not (conditional and refused):
                    raise
                if attempt > 1:
                    ours = await self._holds(key, body)
                    if ours is not None:
                        log.info("conditional_write_was_ours", key=key)
                        return ours
                raise PreconditionFailed(key) from exc
            return clean_etag(resp.get("ETag", ""))

        return await self._call("put", op)

    async def _holds(self, key: str, body: bytes) -> str | None:
        """The ETag of `key` when it holds exactly `body` (our own earlier write)."""
        try:
            resp = await self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise
        async with resp["Body"] as stream:
            data = await stream.read()
        return clean_etag(resp.get("ETag", "")) if data == body else None

    async def delete(self, key: str, if_match: str | None = None) -> bool:
        """Delete `key`; with `if_match`, only while it is that version (PreconditionFailed
        otherwise). True when it was there, False when it was already gone."""
        compare = if_match is not None and not self.conditions.delete

        async def op(_attempt: int) -> bool:
            if compare:
                # The store would ignore the condition: compare first, at every attempt
                # (see Conditions for the window this leaves).
                current = await self.etag_of(key)
                if current is None:
                    return False
                if current != if_match:
                    raise PreconditionFailed(key)
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
            if if_match is not None and not compare:
                kwargs["IfMatch"] = f'"{if_match}"'
            try:
                await self.client.delete_object(**kwargs)
            except ClientError as exc:
                if is_not_found(exc):
                    return False
                if if_match is not None and is_precondition_failed(exc):
                    # Some stores answer 412 for a missing object too; and a retry after
                    # a lost answer finds the object gone: neither is someone else's.
                    if await self.etag_of(key) is None:
                        return False
                    raise PreconditionFailed(key) from exc
                raise
            return True

        return await self._call("delete", op)

    async def copy(self, source_key: str, dest_key: str, if_match: str | None = None) -> None:
        """Copy `source_key` to `dest_key`; with `if_match`, only while the source is that
        version (PreconditionFailed otherwise; FileNotFoundError when it is gone)."""
        if if_match is not None and not self.conditions.copy:
            current = await self.etag_of(source_key)
            if current is None:
                raise FileNotFoundError(source_key)
            if current != if_match:
                raise PreconditionFailed(source_key)
            if_match = None

        async def op(_attempt: int) -> None:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": dest_key,
                                      "CopySource": {"Bucket": self.bucket, "Key": source_key}}
            if if_match is not None:
                kwargs["CopySourceIfMatch"] = f'"{if_match}"'
            try:
                await self.client.copy_object(**kwargs)
            except ClientError as exc:
                if is_not_found(exc):
                    raise FileNotFoundError(source_key) from exc
                if if_match is not None and is_precondition_failed(exc):
                    raise PreconditionFailed(source_key) from exc
                raise

        await self._call("copy", op)

    async def bucket_reachable(self) -> None:
        await self._call("head_bucket", lambda _attempt: self.client.head_bucket(Bucket=self.bucket))

    async def probe_conditions(self, prefix: str) -> Conditions:
        """Which conditional requests the store enforces, tried on a scratch object under
        `prefix` (some S3 services accept the headers and ignore them)."""
        key = f"{prefix}.watcher-probe-{uuid.uuid4().hex}"
        copy_key = f"{key}-copy"
        enforced = {"put": True, "delete": True, "copy": True}
        self.conditions = Conditions(put=True, delete=True, copy=True)  # send them all
        try:
            etag = await self.put(key, b"first", "text/plain", if_none_match=True)
            for name, attempt in (
                ("put", lambda: self.put(key, b"second", "text/plain", if_none_match=True)),
                ("put", lambda: self.put(key, b"third", "text/plain", if_match=f"not-{etag}")),
                ("copy", lambda: self.copy(key, copy_key, if_match=f"not-{etag}")),
                ("delete", lambda: self.delete(key, if_match=f"not-{etag}")),
            ):
                try:
                    await attempt()
                    enforced[name] = False
                except PreconditionFailed:
                    pass
        finally:
            self.conditions = Conditions()
            await self.delete(key)
            await self.delete(copy_key)
        self.conditions = Conditions(**enforced)
        return self.conditions


async def _ignore_attempt(call: Callable[..., Awaitable[T]], kwargs: dict[str, Any], _attempt: int) -> T:
    return await call(**kwargs)


@contextlib.asynccontextmanager
async def open_storage(settings: Settings) -> AsyncIterator[Storage]:
    session = get_session()
    async with session.create_client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key.get_secret_value(),
        aws_secret_access_key=settings.s3_secret_key.get_secret_value(),
        config=client_config(settings),
    ) as client:
        yield Storage(client, settings.s3_bucket, settings.s3_max_attempts)


__all__ = [
    "BotoCoreError",
    "PreconditionFailed",
    "Storage",
    "StorageUnavailable",
    "open_storage",
]

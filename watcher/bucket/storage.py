"""The S3 client: aiobotocore configured for third-party S3 providers, with retries.

Every call goes through `Storage`, which retries transient failures (connection errors,
timeouts, 5xx, throttling) with exponential backoff and jitter and turns exhaustion into
`StorageUnavailable`, so callers only ever see "try again later" or a real answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from functools import partial
from typing import Any, TypeVar

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
from watcher.core.settings import Settings

log = get_logger("watcher.bucket.storage")
T = TypeVar("T")

_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                   "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"}


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """One version of one source object, as discovery saw it."""

    bucket: str
    key: str
    etag: str
    size: int
    last_modified: datetime | None = None
    # SHA-256 of the content, once downloaded (pipeline/fetch.py); not part of the version's identity.
    sha256: str | None = field(default=None, compare=False)


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


def clean_etag(etag: str) -> str:
    return etag.strip().strip('"')


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


class Storage:
    """Thin, retrying wrapper over one aiobotocore S3 client for one bucket."""

    # botocore parses a listing page on the event loop: 1,000 keys hold it ~90 ms on a small
    # box, 250 keys ~20 ms (bench/flood.py); /health must not wait behind that.
    def __init__(self, client: Any, bucket: str, max_attempts: int, list_page_size: int = 250) -> None:
        self.client = client
        self.bucket = bucket
        self.max_attempts = max_attempts
        self.list_page_size = list_page_size
        # Every request sent, by operation (retries included): the daemon counts them.
        self.on_request: Callable[[str], None] = lambda op: None
        self._list_pace = ListPace(None)

    def pace_listing(self, per_second: float | None) -> None:
        """Send list requests at most `per_second` (the listing budget); None: unpaced."""
        self._list_pace = ListPace(per_second)

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
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
                    return await fn()
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
            page: dict[str, Any] = await self._call("list", partial(self.client.list_objects_v2, **kwargs))
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

    # --- single objects --------------------------------------------------------------
    async def head(self, key: str) -> dict[str, Any] | None:
        async def op() -> dict[str, Any] | None:
            try:
                return dict(await self.client.head_object(Bucket=self.bucket, Key=key))
            except ClientError as exc:
                if is_not_found(exc):
                    return None
                raise

        return await self._call("head", op)

    async def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        """Body and ETag of a small object, or None when it does not exist."""
        got = await self.get_if_changed(key, None)
        assert got is not UNCHANGED  # nothing to compare with: never a 304
        return got

    async def get_if_changed(self, key: str, etag: str | None) -> tuple[bytes, str] | Unchanged | None:
        """Like get_bytes, but `UNCHANGED` (a 304, no body sent) while the ETag is `etag`."""

        async def op() -> tuple[bytes, str] | Unchanged | None:
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

    async def download(self, ref: ObjectRef, sink: Callable[[bytes], object]) -> int:
        """Stream one exact version (If-Match) into `sink`; returns bytes written.

        Raises PreconditionFailed if the object changed since discovery and
        FileNotFoundError if it is gone: both mean "drop it, discovery will see the truth".
        """

        async def op() -> int:
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
            written = 0
            async with resp["Body"] as body:
                async for chunk in body.iter_chunks(1024 * 1024):
                    sink(chunk)
                    written += len(chunk)
            return written

        return await self._call("get", op)

    async def put(
        self,
        key: str,
        body: bytes,
        content_type: str,
        metadata: dict[str, str] | None = None,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """PUT an object; returns its ETag. Conditional variants raise PreconditionFailed."""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": body,
            "ContentType": content_type,
            "Metadata": metadata or {},
        }
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match:
            kwargs["IfMatch"] = f'"{if_match}"'

        async def op() -> str:
            try:
                resp = await self.client.put_object(**kwargs)
            except ClientError as exc:
                if (if_none_match or if_match) and is_precondition_failed(exc):
                    raise PreconditionFailed(key) from exc
                raise
            return clean_etag(resp.get("ETag", ""))

        return await self._call("put", op)

    async def delete(self, key: str) -> None:
        async def op() -> None:
            try:
                await self.client.delete_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if not is_not_found(exc):
                    raise

        await self._call("delete", op)

    async def copy(self, source_key: str, dest_key: str) -> None:
        async def op() -> None:
            await self.client.copy_object(
                Bucket=self.bucket,
                Key=dest_key,
                CopySource={"Bucket": self.bucket, "Key": source_key},
            )

        await self._call("copy", op)

    async def bucket_reachable(self) -> None:
        await self._call("head_bucket", lambda: self.client.head_bucket(Bucket=self.bucket))


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
    "ObjectRef",
    "PreconditionFailed",
    "Storage",
    "StorageUnavailable",
    "open_storage",
]

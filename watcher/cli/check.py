"""`watcher check`: is this configuration ready to run? One line per probe, exit 0 or 1.

Operators run it before deploying (and a Kubernetes init container may): it says, with
the variable to change, what `watcher run` would otherwise only log after start-up.
A line starts with `ok`, `warn` (works, with a caveat worth acting on), `FAIL`, or `skip`
(not checked: an earlier check failed, or there is nothing to check here, such as a GPU
on a machine without one); only a `FAIL` makes the exit status 1.
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import ssl
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    ProxyConnectionError,
    ReadTimeoutError,
)
from botocore.exceptions import SSLError as BotoSSLError
from botocore.parsers import ResponseParserError

from watcher.bucket.storage import Storage, error_code, http_status, open_storage
from watcher.cli import gpu
from watcher.core.settings import EngineName, Settings
from watcher.engines import vlm_server
from watcher.intake.sqs import open_sqs

MAX_CLOCK_SKEW_SECONDS = 300  # SigV4 refuses requests 15 minutes off; warn well before
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "RequestTimeTooSkewed",
                     "AuthorizationHeaderMalformed", "InvalidToken", "ExpiredToken"}


# The root elements S3 answers a bucket listing with (or an error): anything else is another server.
_S3_XML_ROOTS = {"error", "listbucketresult", "listallmybucketsresult"}
_XML_ROOT = re.compile(rb"\A(?:<\?xml[^>]*\?>\s*)?(?:<!--.*?-->\s*)*<([A-Za-z_][\w.:-]*)", re.DOTALL)


def _not_s3(status: int, headers: Mapping[str, str], body: bytes) -> str | None:
    """Why an HTTP answer to a bucket listing did not come from S3, or None when it did.

    S3 answers with XML (ListBucketResult, or an Error), and sends x-amz-request-id; a
    health port answers JSON, a web server HTML, a proxy an empty page.
    """
    lower = {key.lower(): value for key, value in headers.items()}
    kind = lower.get("content-type", "").split(";")[0].strip().lower()
    text = body.lstrip(b"\xef\xbb\xbf \t\r\n")[:4096]
    root = _XML_ROOT.match(text)
    if root and root.group(1).split(b":")[-1].decode("ascii").lower() in _S3_XML_ROOTS:
        return None
    foreign = "json" in kind or "html" in kind or text[:1] in (b"{", b"[")
    if "x-amz-request-id" in lower and not foreign and not root:
        return None  # S3's headers, no body worth reading (a proxy may have dropped it)
    if root:
        what = f"XML whose root is <{root.group(1).decode('ascii')}>, not S3's"
    elif not text:
        what = f"an empty body{f' ({kind})' if kind else ''}, not S3's XML"
    else:
        what = f"{kind or 'an untyped body'}, not S3's XML"
    server = lower.get("server", "").strip()
    where = f"server {server[:80]!r}: " if server else ""
    if 300 <= status < 400 and lower.get("location"):
        hint = f"it redirects to {lower['location'][:200]}: is that the address to use?"
    elif status >= 500:
        hint = "is it a proxy in front of a store that is down?"
    elif "html" in kind or text[:1] == b"<":
        hint = "is it a web page, such as the storage's web console?"
    else:
        hint = "is it the watcher's health port, or a web page?"
    return f"it answered HTTP {status} with {what} ({where}{hint})"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception, what it wraps (botocore keeps aiohttp's in kwargs['error']), and what it
    was raised from, each once."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        item = todo.pop(0)
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        wrapped = getattr(item, "kwargs", {}).get("error") if isinstance(item, BotoCoreError) else None
        todo.extend(e for e in (wrapped, item.__cause__, item.__context__) if isinstance(e, BaseException))


def _where(causes: list[BaseException], endpoint: str) -> tuple[str, str]:
    """The host and `host:port` a connection went to: aiohttp's connection key when it has
    one (with virtual addressing that is the bucket's host), else the endpoint's."""
    for item in causes:
        if isinstance(item, aiohttp.ClientConnectorError):
            return item.host, f"{item.host}:{item.port}"
    for item in causes:
        if isinstance(item, BotoCoreError) and isinstance(item.kwargs.get("endpoint_url"), str):
            endpoint = item.kwargs["endpoint_url"]
            break
    url = urlsplit(endpoint)
    host = url.hostname or endpoint
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:
        port = 443 if url.scheme == "https" else 80
    return host, f"{host}:{port}"


def _tls_reason(causes: list[BaseException]) -> str:
    for item in causes:
        message = getattr(item, "verify_message", None)  # aiohttp's certificate error has none
        if isinstance(item, ssl.SSLCertVerificationError) and isinstance(message, str) and message:
            return f"certificate verify failed ({message})"
    for item in causes:
        if isinstance(item, ssl.SSLError) and not isinstance(item, aiohttp.ClientError):
            text = str(item.args[-1] if item.args else item)
            text = re.sub(r"^\[SSL: [A-Z_]+\] | \(_ssl\.c:\d+\)$", "", text).strip()
            return text or (item.reason or type(item).__name__).replace("_", " ").lower()
    return str(causes[0])[:200]


def connection_cause(exc: BaseException, endpoint: str, *, connect_timeout: float | None = None,
                     read_timeout: float | None = None) -> str:
    """Why a request to `endpoint` got no HTTP answer, in words, with the variable to change:
    DNS, connection refused, TLS, a timeout, a dropped connection, or else what the error says."""
    causes = list(_causes(exc))
    host, hostport = _where(causes, endpoint)
    endpoint_host = urlsplit(endpoint).hostname
    virtual = (" (the bucket's own host name: CLOUDRU_S3_ADDRESSING=path avoids it)"
               if endpoint_host and host != endpoint_host and host.endswith(f".{endpoint_host}") else "")

    def seconds(value: float | None) -> str:
        return f" within {value:g} s" if value is not None else ""

    if any(isinstance(e, socket.gaierror | aiohttp.ClientConnectorDNSError) for e in causes):
        return f"cannot resolve host {host!r} (DNS){virtual}: check CLOUDRU_S3_ENDPOINT's host name"
    if any(isinstance(e, ConnectionRefusedError) for e in causes):
        return (f"nothing listens on {hostport} (connection refused): check CLOUDRU_S3_ENDPOINT's "
                "host and port, and that the object storage is running")
    if any(isinstance(e, ssl.SSLError | aiohttp.ClientSSLError | BotoSSLError) for e in causes):
        reason = _tls_reason(causes)
        if "wrong version number" in reason.lower() or "record layer failure" in reason.lower():
            plain = "http://" + endpoint.split("://", 1)[-1]
            tail = f"It seems to speak plain HTTP: set CLOUDRU_S3_ENDPOINT={plain}"
        elif "certificate" in reason.lower():
            tail = ("If the certificate is the store's own, name its CA file in AWS_CA_BUNDLE; "
                    "else check CLOUDRU_S3_ENDPOINT")
        else:
            tail = "Check CLOUDRU_S3_ENDPOINT"
        return (f"TLS handshake with {hostport} failed: {reason}; is the endpoint http:// rather than "
                f"https://, or is the certificate untrusted? {tail}")
    if any(isinstance(e, ProxyConnectionError | aiohttp.ClientProxyConnectionError) for e in causes):
        return (f"cannot connect through the proxy to {hostport}: check HTTPS_PROXY, HTTP_PROXY and "
                "NO_PROXY, and CLOUDRU_S3_ENDPOINT")
    if any(isinstance(e, ConnectTimeoutError | aiohttp.ConnectionTimeoutError) for e in causes):
        return (f"no answer from {hostport}{seconds(connect_timeout)} (connect timeout): is the host up, "
                "or does a firewall drop the packets? check CLOUDRU_S3_ENDPOINT "
                "(WATCHER_S3_CONNECT_TIMEOUT sets the wait)")
    if any(isinstance(e, ReadTimeoutError | aiohttp.ServerTimeoutError | TimeoutError) for e in causes):
        return (f"no answer from {hostport}{seconds(read_timeout)} (read timeout): it accepted the "
                "connection but sent nothing back; is it an S3 server? check CLOUDRU_S3_ENDPOINT "
                "(WATCHER_S3_READ_TIMEOUT sets the wait)")
    if any(isinstance(e, ConnectionClosedError | aiohttp.ServerDisconnectedError
                      | aiohttp.ClientPayloadError | ConnectionResetError) for e in causes):
        return (f"{hostport} closed the connection without an HTTP answer: is it an S3 server, and is "
                "the scheme (http:// or https://) right? check CLOUDRU_S3_ENDPOINT")
    for item in causes:
        if isinstance(item, OSError) and item.strerror:
            return f"cannot connect to {hostport} ({item.strerror}): check CLOUDRU_S3_ENDPOINT"
    return f"cannot connect to {hostport} ({type(exc).__name__}): check CLOUDRU_S3_ENDPOINT"


class ProbeFailed(Exception):
    pass


class ProbeWarning(Exception):
    """It works, with a caveat worth acting on: a `warn` line, not a failure."""


class ProbeSkipped(Exception):
    """Nothing to check on this machine: a `skip` line that says why, not a failure."""


@dataclass
class Probe:
    what: str
    state: str  # ok, warn, FAIL, skip
    detail: str = ""

    def line(self) -> str:
        return f"{self.state:<4} {self.what}" + (f": {self.detail}" if self.detail else "")


class Checker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.probes: list[Probe] = []
        self.server_date: datetime | None = None

    def _scrub(self, text: str) -> str:
        for secret in self.settings.secrets():
            if secret:
                text = text.replace(secret, "***")
        return text

    async def probe(self, what: str, run: Callable[[], Awaitable[str]], needs: bool = True) -> bool:
        """Run one probe unless what it needs failed; record and print its line."""
        if not needs:
            result = Probe(what, "skip", "an earlier check failed")
        else:
            try:
                result = Probe(what, "ok", await run())
            except ProbeFailed as exc:
                result = Probe(what, "FAIL", self._scrub(str(exc)))
            except ProbeWarning as exc:
                result = Probe(what, "warn", self._scrub(str(exc)))
            except ProbeSkipped as exc:
                result = Probe(what, "skip", self._scrub(str(exc)))
            except (ClientError, BotoCoreError, ResponseParserError, aiohttp.ClientError, OSError,
                    TimeoutError) as exc:
                result = Probe(what, "FAIL", self._scrub(f"{type(exc).__name__}: {exc}"))
        self.probes.append(result)
        print(result.line(), flush=True)
        return result.state == "ok"

    async def run(self) -> int:
        s = self.settings
        async with open_storage(s) as storage:
            client = storage.client
            reached = await self.probe(f"S3 at {s.s3_endpoint} accepts these credentials",
                                       lambda: self._credentials(client))
            bucket = await self.probe(f"bucket {s.s3_bucket!r} exists", lambda: self._bucket(client),
                                      reached)
            listed = await self.probe(f"list under {s.input_prefix!r}", lambda: self._list(client),
                                      bucket)
            writes = [await self.probe(f"write, read and delete under {prefix!r}",
                                       functools.partial(self._write_read_delete, storage, prefix), listed)
                      for prefix in (s.output_prefix, s.lease_prefix)]
            await self.probe("conditional requests (If-None-Match, If-Match) enforced",
                             lambda: self._conditional(storage), all(writes))
            await self.probe("clock in step with the S3 server", self._clock, reached)
        if s.sqs_queue_url:
            await self.probe(f"SQS queue {s.sqs_queue_url} readable", self._queue)
        await self.probe(f"engine {s.engine.value}", self._engine)
        if s.engine is EngineName.PADDLEOCR_VL:
            await self.probe("GPU (nvidia-smi) for the image", self._gpu)
            await self.probe(f"Paddle sees the layout model's GPU (WATCHER_LAYOUT_DEVICE={s.layout_device})",
                             self._paddle)
        return 1 if any(p.state == "FAIL" for p in self.probes) else 0

    # --- S3 ---
    async def _list_call(self, client: Any) -> dict[str, Any]:
        s = self.settings
        response: dict[str, Any] = await client.list_objects_v2(
            Bucket=s.s3_bucket, Prefix=s.input_prefix, MaxKeys=1)
        return response

    async def _credentials(self, client: Any) -> str:
        s = self.settings
        answer: dict[str, Any] = {}

        def keep(response_dict: dict[str, Any], **_: Any) -> None:
            """The raw answer, before botocore parses it: is it S3's at all?"""
            body = response_dict.get("body")
            answer.update(status=int(response_dict.get("status_code") or 0),
                          headers=dict(response_dict.get("headers") or {}),
                          body=body if isinstance(body, bytes) else b"")

        def not_s3() -> ProbeFailed | None:
            why = _not_s3(answer["status"], answer["headers"], answer["body"]) if answer else None
            return None if why is None else ProbeFailed(
                f"CLOUDRU_S3_ENDPOINT={s.s3_endpoint} is not an S3 server: {why}; set "
                "CLOUDRU_S3_ENDPOINT to the object storage's address")

        # botocore's own `before-parse.s3.*` handler turns a 200 whose body is not XML into a
        # 500; handlers of `before-parse.*.ListObjectsV2` run before it and see the real status.
        event = "before-parse.*.ListObjectsV2"
        client.meta.events.register_first(event, keep, unique_id="watcher-check-raw-answer")
        try:
            response = await self._list_call(client)
        except ClientError as exc:
            if failed := not_s3():
                raise failed from None
            code = error_code(exc)
            self._remember_date(exc.response)
            if code in _CREDENTIAL_CODES:
                raise ProbeFailed(f"{code}: check CLOUDRU_S3_ACCESS_KEY (Cloud.ru: <tenant_id>:<key_id>), "
                                  "CLOUDRU_S3_SECRET_KEY and CLOUDRU_S3_REGION") from None
            return f"signed requests accepted (the bucket answered {code or http_status(exc)})"
        except ResponseParserError:
            raise (not_s3() or ProbeFailed(
                f"CLOUDRU_S3_ENDPOINT={s.s3_endpoint} is not an S3 server: its answer to a bucket listing "
                "is not S3's XML; set CLOUDRU_S3_ENDPOINT to the object storage's address")) from None
        except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise ProbeFailed(connection_cause(exc, s.s3_endpoint, connect_timeout=s.s3_connect_timeout,
                                               read_timeout=s.s3_read_timeout)) from None
        finally:
            client.meta.events.unregister(event, unique_id="watcher-check-raw-answer")
        if failed := not_s3():
            raise failed
        self._remember_date(response)
        return "signed requests accepted"

    async def _bucket(self, client: Any) -> str:
        try:
            await self._list_call(client)
        except ClientError as exc:
            if error_code(exc) == "NoSuchBucket" or http_status(exc) == 404:
                raise ProbeFailed("no such bucket: check CLOUDRU_S3_BUCKET") from None
            if error_code(exc) != "AccessDenied":
                raise
        return ""

    async def _list(self, client: Any) -> str:
        try:
            await self._list_call(client)
        except ClientError as exc:
            if error_code(exc) == "AccessDenied" or http_status(exc) == 403:
                raise ProbeFailed("access denied: the key needs s3:ListBucket on the bucket") from None
            raise
        return ""

    async def _write_read_delete(self, storage: Storage, prefix: str) -> str:
        key = f"{prefix}.watcher-check-{uuid.uuid4().hex}"
        body = b"watcher check probe"
        try:
            await storage.put(key, body, "text/plain")
            found = await storage.get_bytes(key)
            if found is None or found[0] != body:
                raise ProbeFailed(f"wrote {key!r} but could not read it back")
        finally:
            await storage.delete(key)
        if await storage.head(key) is not None:
            raise ProbeFailed(f"deleted {key!r} but it is still there: the key needs s3:DeleteObject")
        return ""

    async def _conditional(self, storage: Storage) -> str:
        conditions = await storage.probe_conditions(self.settings.lease_prefix)
        if not conditions.put:
            raise ProbeFailed("the store ignores If-None-Match and If-Match on PUT: two replicas "
                              "could read one document; set WATCHER_CLAIM_MODE=shard (with "
                              "WATCHER_SHARD_INDEX and WATCHER_SHARD_COUNT), or run one replica "
                              "(the daemon switches to shards by itself when it finds this)")
        return "; ".join([
            "on PUT",
            "on DELETE" if conditions.delete else
            "not on DELETE (leases and settled sources are compared with a HEAD first)",
            "on copy" if conditions.copy else "not on copy (a moved source is compared with a HEAD first)",
        ])

    def _remember_date(self, response: dict[str, Any]) -> None:
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if date:
            self.server_date = parsedate_to_datetime(date)

    async def _clock(self) -> str:
        if self.server_date is None:
            return "the server sent no Date header; not measured"
        skew = (datetime.now(UTC) - self.server_date).total_seconds()
        if abs(skew) > MAX_CLOCK_SKEW_SECONDS:
            raise ProbeFailed(f"this machine's clock is {skew:+.0f} s off the server's; S3 refuses "
                              "requests 15 minutes off: synchronise the clock (NTP)")
        return f"{skew:+.0f} s"

    # --- engine ---
    async def _queue(self) -> str:
        async with open_sqs(self.settings) as client:
            answer = await client.get_queue_attributes(
                QueueUrl=self.settings.sqs_queue_url, AttributeNames=["ApproximateNumberOfMessages"])
        return f"{answer['Attributes']['ApproximateNumberOfMessages']} messages waiting"

    async def _engine(self) -> str:
        s = self.settings
        if s.engine is EngineName.CPU:
            from watcher.engines.cpu import TessdataMissing, find_tessdata

            try:
                found = find_tessdata(s.ocr_languages, s.tessdata_dir)
            except TessdataMissing as exc:
                raise ProbeFailed(str(exc)) from None
            return f"Tesseract {s.ocr_languages} data in {found}"
        api_key = s.vlm_api_key.get_secret_value() if s.vlm_api_key else None
        async with aiohttp.ClientSession() as session:
            if not await vlm_server.is_healthy(session, s.vlm_url):
                raise ProbeFailed(f"the VLM server at {vlm_server.server_root(s.vlm_url)} does not answer "
                                  "/health: check WATCHER_VLM_URL, and that vLLM is running")
            try:
                await vlm_server.check_model(session, s.vlm_url, s.vlm_model, api_key)
            except RuntimeError as exc:
                raise ProbeFailed(str(exc)) from None
        return f"VLM server healthy, serving {s.vlm_model}"


    # --- the GPU (paddleocr-vl) ---
    @staticmethod
    def _verdict(finding: gpu.Finding) -> str:
        if finding.state == "FAIL":
            raise ProbeFailed(finding.detail)
        if finding.state == "warn":
            raise ProbeWarning(finding.detail)
        if finding.state == "skip":
            raise ProbeSkipped(finding.detail)
        return finding.detail

    async def _gpu(self) -> str:
        return self._verdict(await gpu.nvidia_smi_finding())

    async def _paddle(self) -> str:
        return self._verdict(await gpu.paddle_finding(self.settings.layout_device))


def run_check(settings: Settings) -> int:
    # Fail fast: a check should answer in seconds, not retry like the daemon does.
    quick = settings.model_copy(update={"s3_max_attempts": 1, "s3_connect_timeout": 3.0,
                                        "s3_read_timeout": 10.0})
    return asyncio.run(Checker(quick).run())

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
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from watcher.bucket.storage import Storage, error_code, http_status, open_storage
from watcher.cli import gpu
from watcher.core.settings import EngineName, Settings
from watcher.engines import vlm_server
from watcher.intake.sqs import open_sqs

MAX_CLOCK_SKEW_SECONDS = 300  # SigV4 refuses requests 15 minutes off; warn well before
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "RequestTimeTooSkewed",
                     "AuthorizationHeaderMalformed", "InvalidToken", "ExpiredToken"}


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
            except (ClientError, BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
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
        try:
            response = await self._list_call(client)
        except ClientError as exc:
            code = error_code(exc)
            self._remember_date(exc.response)
            if code in _CREDENTIAL_CODES:
                raise ProbeFailed(f"{code}: check CLOUDRU_S3_ACCESS_KEY (Cloud.ru: <tenant_id>:<key_id>), "
                                  "CLOUDRU_S3_SECRET_KEY and CLOUDRU_S3_REGION") from None
            return f"signed requests accepted (the bucket answered {code or http_status(exc)})"
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise ProbeFailed(f"cannot connect ({type(exc).__name__}): check CLOUDRU_S3_ENDPOINT") from None
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

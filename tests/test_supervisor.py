"""The supervised engine: hangs, aborts and leaks cost a worker process, never the daemon.

The daemon runs as a real process (`python -m watcher run`) against SeaweedFS, with the
paddleocr-vl engine whose `paddleocr` package is the labelled fake in tests/fakes (it
misbehaves by page colour) and whose VLM server is the labelled protocol fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import FAKES, leftovers, make_settings, object_exists, pid_alive
from PIL import Image, ImageColor
from rudocs import pdf_bomb
from vlm_fake import FakeVlmServer
from waiting import eventually

from watcher.bucket.leases import Held, LeaseRecord, Leases
from watcher.bucket.names import Names
from watcher.bucket.storage import PreconditionFailed, StorageUnavailable, open_storage
from watcher.cli.embedded import SeaweedS3, free_ports
from watcher.core.errors import DocumentError, EngineCrashed, EngineUnavailable, ErrorCode
from watcher.core.identity import HOST, INCARNATION
from watcher.core.pages import RenderedPage
from watcher.core.refs import ObjectRef
from watcher.engines.base import EngineState
from watcher.engines.child import ReaderSpec
from watcher.engines.paddleocr_vl import PaddleOcrVlEngine
from watcher.engines.supervisor import SupervisedEngine, _Worker, describe_exit
from watcher.pipeline.fate import Fate, classify

pytestmark = pytest.mark.e2e  # the daemon as a process, engine worker processes


def png(colour: str = "white", size: tuple[int, int] = (600, 800)) -> bytes:
    image = Image.new("RGB", size, "white")
    image.putpixel((0, 0), ImageColor.getrgb(colour))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
async def vlm() -> AsyncIterator[FakeVlmServer]:
    server = await FakeVlmServer().start()
    yield server
    await server.stop()


@dataclass
class Probes:
    """What /health answered while a daemon worked."""

    latencies: list[float] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)

    def pids(self) -> set[int]:
        return {body["pid"] for body in self.bodies}

    def summary(self) -> str:
        ordered = sorted(self.latencies)
        return (f"{len(ordered)} probes, max {ordered[-1] * 1000:.1f} ms, "
                f"p50 {ordered[len(ordered) // 2] * 1000:.1f} ms")


class DaemonProcess:
    """`python -m watcher run` with the fake paddleocr package on its path."""

    def __init__(self, weed: SeaweedS3, bucket: str, vlm: FakeVlmServer, log: Path, **env: str) -> None:
        (self.port,) = free_ports(1)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDRU_", "WATCHER_"))}
        self.env.update(
            CLOUDRU_S3_ENDPOINT=weed.endpoint, CLOUDRU_S3_BUCKET=bucket,
            CLOUDRU_S3_ACCESS_KEY=weed.access_key, CLOUDRU_S3_SECRET_KEY=weed.secret_key,
            WATCHER_HTTP_PORT=str(self.port), WATCHER_HTTP_HOST="127.0.0.1",
            WATCHER_POLL_INTERVAL="0.5", WATCHER_ENGINE="paddleocr-vl", WATCHER_VLM_URL=vlm.url,
            WATCHER_LEASE_SECONDS="30", WATCHER_DRAIN_SECONDS="5",
            PYTHONPATH=os.pathsep.join([str(FAKES), os.environ.get("PYTHONPATH", "")]),
            FAKE_PADDLEOCR_LOG=str(log),
        )
        self.env.update(env)
        self.proc: asyncio.subprocess.Process | None = None
        self.output = b""

    async def start(self) -> DaemonProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "watcher", "run", env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        return self

    async def health(self, session: aiohttp.ClientSession) -> tuple[int, dict[str, Any], float]:
        started = time.perf_counter()
        async with session.get(f"http://127.0.0.1:{self.port}/health",
                               timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return resp.status, await resp.json(), time.perf_counter() - started

    async def metrics(self, session: aiohttp.ClientSession) -> str:
        async with session.get(f"http://127.0.0.1:{self.port}/metrics") as resp:
            return await resp.text()

    async def finish(self, timeout: float = 60) -> int:
        assert self.proc is not None
        out, _ = await asyncio.wait_for(self.proc.communicate(), timeout)
        self.output += out or b""
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.finish()

    async def probe_until(self, session: aiohttp.ClientSession, s3: Any, bucket: str, keys: list[str],
                          timeout: float, every: float) -> Probes:
        """Probe /health all along, until every one of `keys` is in the bucket."""
        probes = Probes()

        async def done() -> bool:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                status, health, seconds = await self.health(session)
                assert status == 200
                probes.latencies.append(seconds)
                probes.bodies.append(health)
            return all(await asyncio.gather(*(asyncio.to_thread(object_exists, s3, bucket, k) for k in keys)))

        await eventually(done, timeout, f"{len(keys)} outputs", every=every)
        return probes

    def events(self) -> list[dict[str, Any]]:
        lines = self.output.decode(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


def worker_pids(log: Path) -> set[int]:
    if not log.exists():
        return set()
    return {json.loads(line)["pid"] for line in log.read_text().splitlines()
            if json.loads(line)["event"] == "init"}


def error_record(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    record: dict[str, Any] = json.loads(body)
    return record


async def test_hangs_aborts_and_leaks_restart_workers_while_the_daemon_serves_on(
    weed: SeaweedS3, bucket: str, s3: Any, vlm: FakeVlmServer, tmp_path: Path
) -> None:
    docs = {"hang": "red", "abort": "lime", "leak": "blue",
            **{f"good-{i}": "white" for i in range(5)}}
    for name, colour in docs.items():
        s3.put_object(Bucket=bucket, Key=f"input/{name}.png", Body=png(colour))
    log = tmp_path / "paddle.jsonl"
    daemon = await DaemonProcess(
        weed, bucket, vlm, log, WATCHER_ENGINE_TIMEOUT="3", WATCHER_ENGINE_MAX_RSS_MB="250",
        WATCHER_MAX_ATTEMPTS="2",
    ).start()
    expected = [f"output/{n}.png.json" for n in docs if n not in ("hang", "abort")]
    expected += ["output/hang.png.error.json", "output/abort.png.error.json"]
    try:
        async with aiohttp.ClientSession() as session:
            # /health is probed all along: it answers, from the one daemon, while workers
            # hang, abort and leak.
            try:
                probes = await daemon.probe_until(session, s3, bucket, expected, 180, every=0.05)
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {daemon.events()[-5:]}") from None
            metrics = await daemon.metrics(session)
            _, health, _ = await daemon.health(session)
    finally:
        code = await daemon.stop()
    assert code == 0, daemon.output[-3000:]
    assert probes.pids() == {daemon.proc.pid if daemon.proc else 0}  # one daemon all along
    seen_workers = {w["pid"] for body in probes.bodies for w in body["engine"]["workers"] if w["pid"]}
    restarts = {reason: float(line.split()[-1]) for line in metrics.splitlines()
                for reason in ("timeout", "crash", "memory")
                if line.startswith(f'watcher_engine_restarts_total{{reason="{reason}"}}')}
    # Each bad page is read on its first attempt (in its batch, then alone); on the last of
    # its two attempts it is blamed and not read again.
    assert restarts["timeout"] >= 1 and restarts["crash"] >= 1 and restarts["memory"] >= 1, restarts
    assert len(seen_workers) >= 2 and len(worker_pids(log)) >= 4  # every restart a new process
    workers = health["engine"]["workers"]  # two pipelines, paddleocr-vl's default
    assert sum(w["restarts"] for w in workers) >= 3
    reasons = {w["last_restart_reason"] for w in workers} - {None}
    assert reasons and reasons <= {"timeout", "crash", "memory"}
    hang = error_record(s3, bucket, "output/hang.png.error.json")["error"]
    assert hang["code"] == "engine_failed" and hang["attempts"] == 2
    assert "engine timeout" in hang["message"] and "WATCHER_ENGINE_TIMEOUT" in hang["message"]
    abort = error_record(s3, bucket, "output/abort.png.error.json")["error"]
    assert abort["code"] == "engine_failed" and "SIGABRT" in abort["message"] and abort["attempts"] == 2
    leak = error_record(s3, bucket, "output/leak.png.json")
    assert leak["pages"][0]["blocks"][0]["text"] == "Fake PaddleOCR-VL page"
    for pid in worker_pids(log):  # drained: no worker outlives the daemon
        assert not pid_alive(pid), pid
    print(f"/health: {probes.summary()}")


async def test_a_document_that_kills_the_pod_is_given_up_after_max_attempts(
    weed: SeaweedS3, bucket: str, s3: Any, vlm: FakeVlmServer, tmp_path: Path
) -> None:
    s3.put_object(Bucket=bucket, Key="input/poison.png", Body=png("magenta"))
    s3.put_object(Bucket=bucket, Key="input/fine.png", Body=png("white"))
    log = tmp_path / "paddle.jsonl"
    deaths = 0
    # The pod restarts like a Kubernetes container: same replica id, host, settings.
    env = {"WATCHER_MAX_ATTEMPTS": "2", "WATCHER_REPLICA_ID": "pod-0",
           "WATCHER_MAX_INFLIGHT_DOCUMENTS": "1"}
    for _run in range(4):
        daemon = await DaemonProcess(weed, bucket, vlm, log, **env).start()
        proc = daemon.proc
        assert proc is not None

        async def died_or_done(proc: asyncio.subprocess.Process = proc) -> bool:
            return proc.returncode is not None or await asyncio.to_thread(
                lambda: all(object_exists(s3, bucket, k) for k in
                            ("output/poison.png.error.json", "output/fine.png.json"))
            )

        await eventually(died_or_done, 90, "the daemon to die or both documents to finish", every=0.3)
        finished = proc.returncode is None
        if finished:
            assert await daemon.stop() == 0
            break
        assert await daemon.finish() == -signal.SIGKILL, daemon.output[-2000:]
        deaths += 1
        # The worker that killed its daemon goes with it (parent-death signal).
        await eventually(lambda: not any(pid_alive(pid) for pid in worker_pids(log)), 30,
                         "the dead daemon's engine workers to go with it")
    assert deaths == 2
    error = error_record(s3, bucket, "output/poison.png.error.json")["error"]
    # Two deaths, the second blamed on its one page; a third run found no page left to read.
    assert error["code"] == "engine_failed" and error["attempts"] == 3
    assert error["message"].count("replica pod-0 died while processing") == 2
    assert "died while processing on page 1" in error["message"]
    assert object_exists(s3, bucket, "output/fine.png.json")
    assert not leftovers(s3, bucket)


def tiff(colours: list[str]) -> bytes:
    """A multi-page TIFF, one page per colour (the fake misbehaves by colour)."""
    frames = [Image.open(io.BytesIO(png(colour))) for colour in colours]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


async def test_only_the_guilty_pay_in_a_pod_restart_loop(
    weed: SeaweedS3, bucket: str, s3: Any, vlm: FakeVlmServer, tmp_path: Path
) -> None:
    """20 good documents, one whose second page kills the pod and one whose third page
    kills its engine worker every time, at the default settings: the pod dies at most
    WATCHER_MAX_ATTEMPTS times, every good document gets its result, and the two bad
    documents get theirs with the guilty page's error and the other pages' text."""
    good = [f"input/good-{n:02d}.png" for n in range(20)]
    for key in good:
        s3.put_object(Bucket=bucket, Key=key, Body=png("white"))
    s3.put_object(Bucket=bucket, Key="input/poison.tiff", Body=tiff(["white", "magenta", "white"]))
    s3.put_object(Bucket=bucket, Key="input/datasheet.tiff",
                  Body=tiff(["white", "white", "lime", "white", "white"]))
    outputs = [f"output/{k.removeprefix('input/')}.json" for k in [*good, "input/poison.tiff",
                                                                    "input/datasheet.tiff"]]
    log = tmp_path / "paddle.jsonl"
    deaths = 0
    for _life in range(6):  # a Kubernetes container: same replica id, host and settings
        daemon = await DaemonProcess(weed, bucket, vlm, log, WATCHER_REPLICA_ID="pod-0").start()
        proc = daemon.proc
        assert proc is not None

        async def died_or_done(proc: asyncio.subprocess.Process = proc) -> bool:
            return proc.returncode is not None or await asyncio.to_thread(
                lambda: all(object_exists(s3, bucket, k) for k in outputs))

        await eventually(died_or_done, 180, "the daemon to die or every document to finish", every=0.5)
        if proc.returncode is None:
            assert await daemon.stop() == 0
            break
        assert await daemon.finish() == -signal.SIGKILL, daemon.output[-2000:]
        deaths += 1
    assert 1 <= deaths <= 3  # WATCHER_MAX_ATTEMPTS, the default
    for key in good:
        assert object_exists(s3, bucket, f"output/{key.removeprefix('input/')}.json"), key
    for name, bad in (("poison.tiff", 1), ("datasheet.tiff", 2)):
        result = json.loads(s3.get_object(Bucket=bucket, Key=f"output/{name}.json")["Body"].read())
        errors = [page.get("error", {}).get("code") for page in result["pages"]]
        assert errors == [("engine_crashed" if i == bad else None) for i in range(len(errors))], name
        assert all(page["blocks"] for i, page in enumerate(result["pages"]) if i != bad), name
        assert [w["code"] for w in result["warnings"] if w["page"] == bad] == ["engine_crashed"]
    assert not leftovers(s3, bucket)


async def test_a_pdf_that_aborts_pdfium_costs_a_decode_worker_never_the_daemon(
    weed: SeaweedS3, bucket: str, s3: Any, vlm: FakeVlmServer, tmp_path: Path
) -> None:
    """A decompression bomb: PDFium wants gigabytes to load its page and aborts when the
    decode worker's address-space cap refuses them. The daemon lives on, answers /health
    all along, and the bomb gets its error record beside the good document's result."""
    s3.put_object(Bucket=bucket, Key="input/bomb.pdf", Body=pdf_bomb(20_000_000))
    s3.put_object(Bucket=bucket, Key="input/fine.png", Body=png("white"))
    outputs = ["output/bomb.pdf.error.json", "output/fine.png.json"]
    daemon = await DaemonProcess(weed, bucket, vlm, tmp_path / "paddle.jsonl", WATCHER_MAX_ATTEMPTS="2",
                                 WATCHER_DECODE_MAX_MB="1024").start()
    try:
        async with aiohttp.ClientSession() as session:
            probes = await daemon.probe_until(session, s3, bucket, outputs, 120, every=0.02)
            _, health, _ = await daemon.health(session)
    finally:
        code = await daemon.stop()
    assert code == 0 and daemon.proc is not None and probes.pids() == {daemon.proc.pid}, daemon.output[-3000:]
    error = error_record(s3, bucket, "output/bomb.pdf.error.json")["error"]
    assert error["code"] == "engine_failed"
    assert "while decoding" in error["message"] and "SIGABRT" in error["message"], error["message"]
    workers = health["decoding"]["workers"]
    assert sum(w["restarts"] for w in workers) >= 1 and health["decoding"]["state"] == "ready"
    assert max(probes.latencies) < 0.25, sorted(probes.latencies)[-5:]
    print(f"/health while PDFium aborted: {probes.summary()}")


async def test_sigterm_with_a_hung_page_drains_releases_and_exits(
    weed: SeaweedS3, bucket: str, s3: Any, vlm: FakeVlmServer, tmp_path: Path
) -> None:
    s3.put_object(Bucket=bucket, Key="input/stuck.png", Body=png("red"))
    log = tmp_path / "paddle.jsonl"
    daemon = await DaemonProcess(weed, bucket, vlm, log, WATCHER_DRAIN_SECONDS="1").start()
    async with aiohttp.ClientSession() as session:

        async def a_worker_busy() -> bool:
            with contextlib.suppress(aiohttp.ClientConnectionError):
                _, health, _ = await daemon.health(session)
                return any(w["state"] == "busy" for w in health["engine"]["workers"])
            return False

        await eventually(a_worker_busy, 60, "an engine worker to be busy")
    assert await daemon.stop() == 0
    names = [e["event"] for e in daemon.events()]
    assert "drain_timeout_releasing" in names and names[-1] == "daemon_stopped"
    assert not any(pid_alive(pid) for pid in worker_pids(log))
    # Released for the next holder, not left to expire.
    assert not leftovers(s3, bucket)


async def test_only_the_page_that_hangs_is_charged_when_its_batch_fails(
    weed: SeaweedS3, vlm: FakeVlmServer
) -> None:
    # One pipeline, so that the four pages go to it as one batch.
    settings = make_settings(weed, "unused", engine="paddleocr-vl", vlm_url=vlm.url,
                             engine_timeout=2, vlm_startup_timeout=30, engine_concurrency=1)
    engine = PaddleOcrVlEngine(settings, pipeline_factory="fake_paddleocr:PaddleOCRVL")
    restarts: list[str] = []
    engine.on_restart = restarts.append
    await engine.start()
    try:
        assert engine.state is EngineState.READY, engine.error
        pages = [Image.open(io.BytesIO(png(c))).convert("RGB") for c in ("white", "red", "white", "white")]
        results = await asyncio.gather(
            *(engine.recognise(RenderedPage(i, im, *im.size)) for i, im in enumerate(pages)),
            return_exceptions=True,
        )
    finally:
        await engine.close()
    assert isinstance(results[1], EngineCrashed) and results[1].reason == "timeout"
    assert all(not isinstance(r, BaseException) for i, r in enumerate(results) if i != 1), results
    assert set(restarts) == {"timeout"}


# --- why a worker died ------------------------------------------------------------------------
async def test_every_abort_is_recorded_as_sigabrt_not_as_a_silent_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pipe breaks before the kernel can report the status; the record must wait for it."""
    monkeypatch.syspath_prepend(str(FAKES))  # spawn hands sys.path to the worker
    engine = SupervisedEngine(ReaderSpec("dying_reader:DyingReader"), name="dying", model="fake")
    page = RenderedPage(0, Image.new("RGB", (8, 8), "white"), 8, 8)
    details: list[str] = []
    await engine.warm()
    try:
        for _ in range(12):
            with pytest.raises(EngineCrashed) as crash:
                await engine.recognise(page)
            details.append(crash.value.detail)
    finally:
        await engine.close()
    assert details == ["the worker was killed by SIGABRT"] * 12


class _ExitingProcess:
    """A process whose exit status becomes readable a few polls after its sentinel fired."""

    def __init__(self, polls_before_status: int) -> None:
        self.polls_left = polls_before_status

    @property
    def exitcode(self) -> int | None:
        if self.polls_left:
            self.polls_left -= 1
            return None
        return -signal.SIGABRT

    def join(self, timeout: float | None = None) -> None:
        return None


async def test_reaping_waits_for_the_status_after_the_sentinel_fires() -> None:
    exited = asyncio.get_running_loop().create_future()
    exited.set_result(None)
    process = _ExitingProcess(polls_before_status=5)
    worker = _Worker(0, process=process, exited=exited)  # type: ignore[arg-type]
    engine = SupervisedEngine(ReaderSpec("unused:Unused"), name="t", model="t")
    await engine._reap(worker)
    assert describe_exit(process.exitcode) == "the worker was killed by SIGABRT"

    stuck = _Worker(1, process=_ExitingProcess(polls_before_status=10**9), exited=exited)  # type: ignore[arg-type]
    await engine._reap(stuck, seconds=0.05)  # bounded: a status that never comes is given up
    assert describe_exit(stuck.process.exitcode) == "the worker stopped answering"  # type: ignore[union-attr]


# --- attempts in the lease ---------------------------------------------------------------------
async def test_attempts_live_in_the_lease_and_survive_replicas_and_restarts(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    ref = ObjectRef(bucket, "input/a.pdf", "etag-1", 10)
    one = make_settings(weed, bucket, replica_id="one")
    two = make_settings(weed, bucket, replica_id="two")
    names = Names.from_settings(one)
    lease_key = names.lease(ref.key)

    def put_record(**fields: Any) -> None:
        record = LeaseRecord(owner="ghost", source_key=ref.key, source_etag="etag-1",
                             expires_at=time.time() + 60, host="elsewhere", pid=1,
                             incarnation="old")
        record.__dict__.update(fields)
        s3.put_object(Bucket=bucket, Key=lease_key, Body=record.encode())

    def current() -> LeaseRecord:
        parsed = LeaseRecord.parse(s3.get_object(Bucket=bucket, Key=lease_key)["Body"].read())
        assert parsed is not None
        return parsed

    async with open_storage(one) as storage:
        claims_one, claims_two = Leases(storage, one, names), Leases(storage, two, names)
        lease = await claims_one.acquire(ref)
        assert lease is not None and lease.crashes == 0
        assert isinstance(await claims_two.acquire(ref), Held)  # live and held
        assert await lease.record_crash("engine crash: the worker was killed by SIGSEGV") == 1
        assert current().released and current().crashes == 1
        again = await claims_two.acquire(ref)  # released: taken at once, count kept
        assert again is not None and again.crashes == 1
        await again.release()
        assert current().crashes == 1  # a transient release keeps what was counted
        put_record(expires_at=time.time() - 1, crashes=1)  # a holder that vanished
        taken = await claims_one.acquire(ref)
        assert taken is not None and taken.crashes == 2
        assert "replica ghost stopped renewing its lease" in taken.history[-1]
        await taken.finish()
        assert not object_exists(s3, bucket, lease_key)
        # A new source version starts counting afresh.
        put_record(released=True, crashes=5, source_etag="etag-0")
        fresh = await claims_one.acquire(ref)
        assert fresh is not None and fresh.crashes == 0
        await fresh.finish()
        # Our own lease (a release that failed while S3 was away) is taken back at once.
        put_record(owner="one", host=HOST, pid=os.getpid(), incarnation=INCARNATION)
        mine = await claims_one.acquire(ref)
        assert mine is not None and mine.crashes == 0
        await mine.finish()
        # A restarted container: same replica and host, the old process is gone.
        put_record(owner="one", host=HOST, pid=os.getpid(), incarnation="previous-life")
        restarted = await claims_one.acquire(ref)
        assert restarted is not None and restarted.crashes == 1
        assert "replica one died while processing" in restarted.history[-1]
        await restarted.finish()
        # Another live process on this host under the same id is left alone until expiry.
        put_record(owner="one", host=HOST, pid=os.getppid(), incarnation="sibling")
        assert isinstance(await claims_one.acquire(ref), Held)


@pytest.mark.parametrize(
    ("exc", "fate"),
    [
        (DocumentError(ErrorCode.CORRUPT, "bad"), Fate.PERMANENT),
        (StorageUnavailable("down"), Fate.TRANSIENT),
        (EngineUnavailable("vLLM down"), Fate.TRANSIENT),
        (PreconditionFailed("changed"), Fate.GONE),
        (FileNotFoundError("gone"), Fate.GONE),
        (EngineCrashed("timeout", "no answer"), Fate.CRASH),
        (KeyError("bug"), Fate.CRASH),
    ],
)
def test_one_place_says_what_each_failure_means(exc: Exception, fate: Fate) -> None:
    failure = classify(exc)
    assert failure.fate is fate
    if fate is Fate.CRASH:
        expected = ErrorCode.ENGINE_FAILED if isinstance(exc, EngineCrashed) else ErrorCode.INTERNAL
        assert failure.code is expected

"""`watcher check` against the real SeaweedFS: what passes, and each failure named."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import lenient_store
from vlm_fake import FakeVlmServer
from waiting import eventually

from watcher.cli import gpu
from watcher.cli.check import Checker, Probe, _not_s3, connection_cause
from watcher.cli.embedded import SeaweedS3
from watcher.core.settings import load_settings
from watcher.service.http import serve_app

pytestmark = pytest.mark.e2e  # `watcher check` in subprocesses


def env_for(weed: SeaweedS3, bucket: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDRU_", "WATCHER_"))}
    env.update(CLOUDRU_S3_ENDPOINT=weed.endpoint, CLOUDRU_S3_BUCKET=bucket,
               CLOUDRU_S3_ACCESS_KEY=weed.access_key, CLOUDRU_S3_SECRET_KEY=weed.secret_key)
    env.update(extra)
    return env


def check_cli(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "watcher", "check"], env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_ready_configuration_passes_every_probe(weed: SeaweedS3, bucket: str, s3: Any) -> None:
    proc = check_cli(env_for(weed, bucket))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 8 and all(line.startswith("ok ") for line in lines), lines
    assert "conditional requests" in proc.stdout and "Tesseract rus+eng" in proc.stdout
    # Its probe objects are gone.
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_a_wrong_secret_is_named_and_the_rest_skipped(weed: SeaweedS3, bucket: str) -> None:
    wrong = "not-the-secret-0f3c9a"
    proc = check_cli(env_for(weed, bucket, CLOUDRU_S3_SECRET_KEY=wrong))
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("FAIL S3") and "SignatureDoesNotMatch" in lines[0]
    assert "CLOUDRU_S3_SECRET_KEY" in lines[0]
    assert all(line.startswith("skip") for line in lines[1:-1]), lines
    assert wrong not in proc.stdout + proc.stderr


def test_bad_settings_exit_2_before_probing(weed: SeaweedS3, bucket: str) -> None:
    proc = check_cli(env_for(weed, bucket, WATCHER_HTTP_PORT="eighty"))
    assert proc.returncode == 2 and "WATCHER_HTTP_PORT" in proc.stderr and proc.stdout == ""


async def run_checker(weed: SeaweedS3, bucket: str, endpoint: str | None = None, **values: Any) -> Checker:
    settings = load_settings(s3_endpoint=endpoint or weed.endpoint, s3_bucket=bucket,
                             s3_access_key=weed.access_key, s3_secret_key=weed.secret_key,
                             s3_max_attempts=1, **values)
    checker = Checker(settings)
    await checker.run()
    return checker


def by_state(checker: Checker) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for probe in checker.probes:
        found.setdefault(probe.state, []).append(f"{probe.what}: {probe.detail}")
    return found


async def test_a_missing_bucket_and_an_absent_vlm_server_are_named(weed: SeaweedS3) -> None:
    checker = await run_checker(weed, "no-such-bucket-here", engine="openai-vlm",
                                vlm_url="http://127.0.0.1:9/v1")
    failed = by_state(checker)["FAIL"]
    assert any("bucket 'no-such-bucket-here'" in f and "CLOUDRU_S3_BUCKET" in f for f in failed)
    assert any("engine openai-vlm" in f and "WATCHER_VLM_URL" in f for f in failed)
    assert checker.probes[0].state == "ok"  # the credentials themselves are fine


async def test_a_store_that_ignores_conditional_writes_is_told_to_use_shards(
    weed: SeaweedS3, bucket: str
) -> None:
    async with lenient_store(weed) as endpoint:
        checker = await run_checker(weed, bucket, endpoint=endpoint)
    failed = by_state(checker).get("FAIL", [])
    assert len(failed) == 1 and "conditional requests" in failed[0], failed
    assert "WATCHER_CLAIM_MODE=shard" in failed[0]


# --- the GPU, for WATCHER_ENGINE=paddleocr-vl ----------------------------------------------
GPU_QUERY = "--query-gpu=name,driver_version,memory.total,compute_cap"
OLD_GPU_QUERY = "--query-gpu=name,driver_version,memory.total"
NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.")


def fake_nvidia_smi(bin_dir: Path, answers: dict[str, tuple[str, int]]) -> None:
    """A FAKE `nvidia-smi`: prints the given output and exits with the given code for each
    `--query-gpu=...` it knows (with `--format=csv,noheader`); anything else is exit 2."""
    bin_dir.mkdir(exist_ok=True)
    cases = "".join(
        f"  '{query} --format=csv,noheader')\n    printf '%s' {shlex.quote(out)}\n    exit {code} ;;\n"
        for query, (out, code) in answers.items())
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\n# A FAKE nvidia-smi (tests/test_check.py).\n"
                      f'case "$*" in\n{cases}esac\n'
                      'echo "fake nvidia-smi: unexpected arguments: $*" >&2\nexit 2\n')
    script.chmod(0o755)


FAKE_PADDLE = '''"""A FAKE `paddle` (tests/test_check.py): only what `watcher check` asks of it, with
FAKE_PADDLE_GPUS GPUs seen."""
import os

__version__ = "3.3.0"


class device:
    class cuda:
        @staticmethod
        def device_count():
            return int(os.environ.get("FAKE_PADDLE_GPUS", "1"))

    @staticmethod
    def is_compiled_with_cuda():
        return True
'''


@pytest.fixture
async def vlm() -> AsyncIterator[FakeVlmServer]:
    server = await FakeVlmServer().start()
    yield server
    await server.stop()


async def gpu_check(weed: SeaweedS3, bucket: str, vlm: FakeVlmServer,
                    **values: Any) -> tuple[int, dict[str, Probe]]:
    settings = load_settings(s3_endpoint=weed.endpoint, s3_bucket=bucket, s3_access_key=weed.access_key,
                             s3_secret_key=weed.secret_key, s3_max_attempts=1, engine="paddleocr-vl",
                             vlm_url=vlm.url, **values)
    checker = Checker(settings)
    code = await checker.run()
    others = [p for p in checker.probes if not p.what.startswith(("GPU", "Paddle"))]
    assert all(p.state == "ok" for p in others), [p.line() for p in others]
    return code, {p.what.split()[0]: p for p in checker.probes if p.what.startswith(("GPU", "Paddle"))}


def without_paddle() -> None:
    if importlib.util.find_spec("paddle") is not None:
        pytest.skip("paddle is installed here: its absence cannot be checked")


@pytest.mark.parametrize(("answer", "state", "words", "code"), [
    ("NVIDIA H200, 570.124.06, 143771 MiB, 9.0", "ok",
     ["NVIDIA H200, 140.4 GiB, driver 570.124.06, compute capability 9.0", "525.60.13"], 0),
    ("NVIDIA A10, 535.183.01, 23028 MiB, 8.6", "warn",
     ["driver 535.183.01", "minor-version compatibility", "570 or newer"], 0),
    ("Tesla T4, 470.256.02, 15360 MiB, 7.5", "FAIL",
     ["driver 470.256.02 is older than 525.60.13", "upgrade the NVIDIA driver"], 1),
    ("NVIDIA GeForce GTX 1080 Ti, 570.133.07, 11264 MiB, 6.1", "FAIL",
     ["compute capability 6.1 is below 7.0"], 1),
    ("NVIDIA L4, 570.124.06, 23034 MiB, 8.9\nTesla P40, 570.124.06, 23040 MiB, 6.1", "FAIL",
     ["GPU 0: NVIDIA L4", "GPU 1: Tesla P40", "compute capability 6.1 is below 7.0"], 1),
], ids=["good", "driver-535-warns", "old-driver", "compute-6.1", "one-of-two-too-old"])
async def test_the_gpu_is_judged_against_what_the_image_needs(
    weed: SeaweedS3, bucket: str, vlm: FakeVlmServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    answer: str, state: str, words: list[str], code: int,
) -> None:
    without_paddle()
    fake_nvidia_smi(tmp_path / "bin", {GPU_QUERY: (answer + "\n", 0)})
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    exit_code, found = await gpu_check(weed, bucket, vlm)
    gpu = found["GPU"]
    assert gpu.state == state, gpu.line()
    assert all(word in gpu.detail for word in words), gpu.line()
    assert found["Paddle"].state == "skip" and "paddle is not importable" in found["Paddle"].detail
    assert exit_code == code  # warn and skip lines pass; FAIL does not


async def test_nvidia_smi_failing_absent_or_too_old_to_know_compute_capability(
    weed: SeaweedS3, bucket: str, vlm: FakeVlmServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    without_paddle()
    fake_nvidia_smi(tmp_path / "failing", {GPU_QUERY: (NO_DRIVER + "\n", 9)})
    monkeypatch.setenv("PATH", str(tmp_path / "failing"))
    exit_code, found = await gpu_check(weed, bucket, vlm)
    assert found["GPU"].state == "FAIL" and exit_code == 1
    assert found["GPU"].detail == f"nvidia-smi failed (exit 9): {NO_DRIVER}"

    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    exit_code, found = await gpu_check(weed, bucket, vlm)
    assert found["GPU"].state == "skip" and found["GPU"].detail.startswith("nvidia-smi not found")
    assert found["GPU"].line().startswith("skip GPU") and exit_code == 0

    # Drivers before 510 refuse the compute_cap field: asked again without it.
    fake_nvidia_smi(tmp_path / "old", {
        GPU_QUERY: ('Field "compute_cap" is not a valid field to query.\n', 2),
        OLD_GPU_QUERY: ("Tesla K80, 470.82.01, 11441 MiB\n", 0)})
    monkeypatch.setenv("PATH", str(tmp_path / "old"))
    exit_code, found = await gpu_check(weed, bucket, vlm)
    assert found["GPU"].state == "FAIL" and "driver 470.82.01 is older than 525.60.13" in found["GPU"].detail
    assert "compute capability not reported" in found["GPU"].detail


async def test_paddle_is_asked_in_a_subprocess_whether_it_sees_the_layout_models_gpu(
    weed: SeaweedS3, bucket: str, vlm: FakeVlmServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_nvidia_smi(tmp_path / "bin", {GPU_QUERY: ("NVIDIA H200, 570.124.06, 143771 MiB, 9.0\n", 0)})
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "site" / "paddle").mkdir(parents=True)
    (tmp_path / "site" / "paddle" / "__init__.py").write_text(FAKE_PADDLE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))  # found here, imported in the subprocess
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))

    monkeypatch.setenv("FAKE_PADDLE_GPUS", "1")
    exit_code, found = await gpu_check(weed, bucket, vlm)
    assert found["Paddle"].state == "ok" and exit_code == 0, found["Paddle"].line()
    assert found["Paddle"].detail == "paddle 3.3.0 (CUDA build) sees 1 GPU"

    monkeypatch.setenv("FAKE_PADDLE_GPUS", "0")
    exit_code, found = await gpu_check(weed, bucket, vlm)
    assert found["Paddle"].state == "FAIL" and exit_code == 1
    assert "WATCHER_LAYOUT_DEVICE=gpu the engine's warm-up fails" in found["Paddle"].detail
    assert found["Paddle"].what.endswith("(WATCHER_LAYOUT_DEVICE=gpu)")

    exit_code, found = await gpu_check(weed, bucket, vlm, layout_device="cpu")
    assert found["Paddle"].state == "ok" and exit_code == 0
    assert "WATCHER_LAYOUT_DEVICE=cpu does not use one" in found["Paddle"].detail


def test_the_gpu_lines_come_from_watcher_check_itself(weed: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    fake_nvidia_smi(tmp_path / "bin", {GPU_QUERY: ("NVIDIA A10, 535.183.01, 23028 MiB, 8.6\n", 0)})
    env = env_for(weed, bucket, WATCHER_ENGINE="paddleocr-vl", WATCHER_VLM_URL="http://127.0.0.1:9/v1",
                  PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    proc = check_cli(env)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1  # no VLM server at port 9
    assert lines[-2].startswith("warn GPU (nvidia-smi) for the image: NVIDIA A10, 22.5 GiB"), lines
    assert lines[-1].startswith(("skip Paddle", "ok   Paddle", "FAIL Paddle")), lines


async def test_a_hanging_nvidia_smi_is_given_up_after_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n# A FAKE nvidia-smi that hangs, as on a wedged driver.\n"
                                        "exec sleep 60\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    started = time.monotonic()
    finding = await gpu.nvidia_smi_finding(timeout=0.5)
    assert time.monotonic() - started < 10
    assert finding == gpu.Finding("FAIL", "nvidia-smi gave no answer within 0.5 s: the driver may be "
                                          "wedged; the GPU is not usable")


# --- an endpoint that is not S3, or cannot be reached ---------------------------------------
SECRET = "check-secret-never-printed-5e1d"
S3_PROBES = 6  # credentials, bucket, list, two write/read/delete, conditional; then clock, engine


async def check_endpoint(endpoint: str, capsys: pytest.CaptureFixture[str],
                         **values: Any) -> tuple[int, list[str]]:
    """`watcher check`'s Checker against `endpoint`, with a secret that must never be printed."""
    settings = load_settings(s3_endpoint=endpoint, s3_bucket="some-bucket", s3_access_key="tenant-1:key-1",
                             s3_secret_key=SECRET, s3_max_attempts=1, **values)
    code = await Checker(settings).run()
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    lines = out.out.strip().splitlines()
    # The first probe names the cause; every other S3 probe is skipped, not blamed.
    assert lines[0].startswith("FAIL S3 at "), lines
    assert all(line.startswith("skip") for line in lines[1:S3_PROBES + 1]), lines
    assert "CLOUDRU_S3_BUCKET" not in out.out and code == 1
    return code, lines


@contextlib.asynccontextmanager
async def http_server(answer: Callable[[], web.Response]) -> AsyncIterator[int]:
    """A plain HTTP server (aiohttp, as the watcher's health port is) giving one answer to
    every request; yields its port."""
    async def handle(_request: web.Request) -> web.Response:
        return answer()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner, port = await serve_app(app, "127.0.0.1", 0)
    try:
        yield port
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers; yields its port."""
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port  # nothing listens once the socket is closed


def health_404() -> web.Response:
    return web.json_response({"error": "no result 'some-bucket' to show"}, status=404)


def web_page() -> web.Response:
    return web.Response(status=200, text="<!doctype html><html><body>Welcome</body></html>",
                        content_type="text/html")


@pytest.mark.parametrize(("answer", "words"), [
    (health_404, ["HTTP 404 with application/json", "watcher's health port"]),
    (web_page, ["HTTP 200 with text/html", "web page"]),
], ids=["json-404", "html-200"])
async def test_a_server_that_is_not_s3_is_named_as_such(
    capsys: pytest.CaptureFixture[str], answer: Callable[[], web.Response], words: list[str]
) -> None:
    async with http_server(answer) as port:
        endpoint = f"http://127.0.0.1:{port}"
        _code, lines = await check_endpoint(endpoint, capsys)
    assert f"CLOUDRU_S3_ENDPOINT={endpoint} is not an S3 server: it answered" in lines[0], lines[0]
    assert "not S3's XML" in lines[0]
    assert "set CLOUDRU_S3_ENDPOINT to the object storage's address" in lines[0]
    assert all(word in lines[0] for word in words), lines[0]
    assert "accepts these credentials: CLOUDRU" in lines[0]  # no "signed requests accepted"


@pytest.mark.e2e
async def test_check_pointed_at_a_running_watchers_health_port_says_it_is_not_s3() -> None:
    """The slip from the report: CLOUDRU_S3_ENDPOINT set to the watcher's own port 8081."""
    health = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDRU_", "WATCHER_"))}
    env.update(CLOUDRU_S3_BUCKET="some-bucket", CLOUDRU_S3_ACCESS_KEY="tenant-1:key-1",
               CLOUDRU_S3_SECRET_KEY=SECRET, WATCHER_HTTP_HOST="127.0.0.1")
    # A real daemon (its S3 is nowhere: it serves /health all the same).
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watcher", "run",
        env={**env, "CLOUDRU_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}",
             "WATCHER_HTTP_PORT": str(health)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        async def answers() -> bool:
            try:
                async with aiohttp.ClientSession() as session:
                    async with session.get(f"http://127.0.0.1:{health}/health") as response:
                        return response.status in (200, 503)
            except aiohttp.ClientError:
                return False

        await eventually(answers, 60, "the daemon's /health")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "watcher", "check",
            env={**env, "CLOUDRU_S3_ENDPOINT": f"http://127.0.0.1:{health}"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        daemon.terminate()
        await daemon.wait()
    assert proc.returncode == 1, out + err
    first = out.decode().splitlines()[0]
    assert first.startswith("FAIL S3") and "is not an S3 server" in first, first
    assert f"CLOUDRU_S3_ENDPOINT=http://127.0.0.1:{health}" in first
    assert b"CLOUDRU_S3_BUCKET" not in out and SECRET.encode() not in out + err


async def test_an_unknown_host_is_a_dns_failure(capsys: pytest.CaptureFixture[str]) -> None:
    _code, lines = await check_endpoint("http://nothing.invalid:9000", capsys)
    assert "cannot resolve host 'nothing.invalid' (DNS): check CLOUDRU_S3_ENDPOINT's host name" in lines[0]
    assert "refused" not in lines[0]

    _code, lines = await check_endpoint("http://nothing.invalid:9000", capsys, s3_addressing="virtual")
    assert "cannot resolve host 'some-bucket.nothing.invalid' (DNS)" in lines[0]
    assert "CLOUDRU_S3_ADDRESSING=path" in lines[0]


async def test_a_port_nobody_listens_on_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    _code, lines = await check_endpoint(f"http://127.0.0.1:{port}", capsys)
    assert f"nothing listens on 127.0.0.1:{port} (connection refused)" in lines[0], lines[0]
    assert "CLOUDRU_S3_ENDPOINT" in lines[0] and "DNS" not in lines[0]


async def test_https_to_a_plain_http_server_is_a_tls_failure(capsys: pytest.CaptureFixture[str]) -> None:
    async with http_server(health_404) as port:
        _code, lines = await check_endpoint(f"https://127.0.0.1:{port}", capsys)
    assert f"TLS handshake with 127.0.0.1:{port} failed: " in lines[0], lines[0]
    assert "is the endpoint http:// rather than https://, or is the certificate untrusted?" in lines[0]
    assert f"set CLOUDRU_S3_ENDPOINT=http://127.0.0.1:{port}" in lines[0]


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


async def test_an_untrusted_certificate_is_a_tls_failure_and_aws_ca_bundle_cures_it(
    capsys: pytest.CaptureFixture[str], self_signed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = self_signed
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    app = web.Application()

    async def not_found(_request: web.Request) -> web.Response:
        return web.json_response({}, status=404)

    app.router.add_route("*", "/{tail:.*}", not_found)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock, ssl_context=context).start()
    endpoint = f"https://127.0.0.1:{sock.getsockname()[1]}"
    try:
        monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
        _code, lines = await check_endpoint(endpoint, capsys)
        assert "TLS handshake with 127.0.0.1:" in lines[0] and "certificate verify failed" in lines[0]
        assert "AWS_CA_BUNDLE" in lines[0], lines[0]

        monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))  # trusted now: the answer itself is read
        _code, lines = await check_endpoint(endpoint, capsys)
        assert "is not an S3 server: it answered HTTP 404 with application/json" in lines[0], lines[0]
    finally:
        await runner.cleanup()


async def test_a_server_that_never_answers_times_out_quickly(capsys: pytest.CaptureFixture[str]) -> None:
    async with silent_server() as port:
        started = time.monotonic()
        _code, lines = await check_endpoint(f"http://127.0.0.1:{port}", capsys,
                                            s3_connect_timeout=0.5, s3_read_timeout=0.5)
        assert time.monotonic() - started < 5
    assert f"no answer from 127.0.0.1:{port} within 0.5 s (read timeout)" in lines[0], lines[0]
    assert "CLOUDRU_S3_ENDPOINT" in lines[0] and "WATCHER_S3_READ_TIMEOUT" in lines[0]


# connection_cause on aiohttp's own exceptions (botocore's wrappers are above), from real connections.
async def failure(url: str, timeout: float = 5.0) -> BaseException:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http, \
                http.get(url) as response:
            await response.read()
    except Exception as exc:
        return exc
    raise AssertionError(f"{url} answered")


async def test_connection_cause_reads_aiohttps_exceptions_too() -> None:
    dns = await failure("http://nothing.invalid:9000/")
    assert connection_cause(dns, "http://nothing.invalid:9000").startswith(
        "cannot resolve host 'nothing.invalid' (DNS)")
    port = free_port()
    refused = await failure(f"http://127.0.0.1:{port}/")
    assert connection_cause(refused, f"http://127.0.0.1:{port}").startswith(
        f"nothing listens on 127.0.0.1:{port} (connection refused)")
    async with http_server(health_404) as port:
        tls = await failure(f"https://127.0.0.1:{port}/")
    assert connection_cause(tls, f"https://127.0.0.1:{port}").startswith(
        f"TLS handshake with 127.0.0.1:{port} failed")
    async with silent_server() as port:
        silent = await failure(f"http://127.0.0.1:{port}/", timeout=0.3)
    assert connection_cause(silent, f"http://127.0.0.1:{port}", read_timeout=0.3).startswith(
        f"no answer from 127.0.0.1:{port} within 0.3 s")


S3_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NoSuchBucket</Code>'
            b"<Message>The specified bucket does not exist</Message></Error>")
S3_LISTING = (b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
              b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name></ListBucketResult>')


@pytest.mark.parametrize(("status", "headers", "body", "words"), [
    (404, {"Content-Type": "application/xml", "x-amz-request-id": "1"}, S3_ERROR, None),
    (404, {"Content-Type": "application/xml"}, S3_ERROR, None),  # a proxy dropped the x-amz headers
    (200, {"Content-Type": "application/xml"}, S3_LISTING, None),
    (403, {"X-Amz-Request-Id": "1"}, b"", None),
    (404, {"Content-Type": "application/json; charset=utf-8", "Server": "Python/3.11 aiohttp"},
     b'{"error": "not found"}', ["HTTP 404 with application/json", "server 'Python/3.11 aiohttp'",
                                 "watcher's health port"]),
    (404, {"Content-Type": "application/json", "x-amz-request-id": "1"}, b"{}", ["application/json"]),
    (200, {"Content-Type": "text/html"}, b"<!DOCTYPE html><html></html>", ["text/html", "web page"]),
    (404, {"Content-Type": "text/plain"}, b"404: Not Found", ["HTTP 404 with text/plain"]),
    (404, {"Server": "keryx"}, b"", ["HTTP 404 with an empty body"]),
    (301, {"Location": "https://store.example/some-bucket"}, b"", ["redirects to https://store.example"]),
    (502, {"Content-Type": "text/html"}, b"<html>Bad Gateway</html>", ["HTTP 502", "proxy"]),
    (200, {"Content-Type": "application/xml"}, b"<?xml version='1.0'?><rss/>", ["root is <rss>"]),
], ids=["s3-error", "s3-error-bare", "s3-listing", "s3-headers-only", "json", "json-with-amz-header",
        "html", "text", "empty", "redirect", "bad-gateway", "other-xml"])
def test_not_s3_tells_s3s_answers_from_other_servers(
    status: int, headers: dict[str, str], body: bytes, words: list[str] | None
) -> None:
    why = _not_s3(status, headers, body)
    if words is None:
        assert why is None
    else:
        assert why is not None and all(word in why for word in words), why
        assert why.startswith(f"it answered HTTP {status} with ")

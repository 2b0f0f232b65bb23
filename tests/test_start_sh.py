"""start.sh, the container entrypoint, run for real in front of the real daemon.

There is no GPU here, so the GPU side is faked at its process boundary: `nvidia-smi` and
`vllm` (or `paddleocr`) are small scripts put first on PATH. Everything else is real:
bash runs start.sh, start.sh execs `python -m watcher run` with the CPU engine, and the
daemon serves /health while S3 is unreachable (a closed loopback port).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import pid_alive

from watcher.cli.embedded import free_ports
from watcher.core.settings import DEFAULT_PIPELINE_VERSION, PADDLEOCR_VL_MODELS, Settings

REPO = Path(__file__).resolve().parents[1]
START_SH = REPO / "start.sh"

pytestmark = pytest.mark.timeout(120)

FAKE_NVIDIA_SMI = """#!/bin/sh
# FAKE nvidia-smi: a protocol-boundary stand-in (no GPU here); lists one GPU like `-L` does.
echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-fake)"
"""

FAKE_VLM_SERVER = '''#!{python}
"""FAKE VLM server (stands in for `vllm serve` / `paddleocr genai_server`).

A protocol-boundary fake: there is no GPU here, so it only records how start.sh called it
and then behaves as FAKE_VLLM_MODE says: crash (exit 3 at once), hang (never serves) or
late (serves 200 on /health at --port after FAKE_VLLM_DELAY seconds).
"""
import http.server, json, os, sys, time

with open(os.environ["FAKE_VLLM_RECORD"], "w") as f:
    json.dump({{"argv": sys.argv, "pid": os.getpid(),
               "hf_home": os.environ.get("HF_HOME"),
               "paddlex_home": os.environ.get("PADDLE_PDX_CACHE_HOME")}}, f)
print("fake vllm starting", flush=True)
mode = os.environ["FAKE_VLLM_MODE"]
if mode == "crash":
    print("fake vllm: RuntimeError: CUDA out of memory", flush=True)
    sys.exit(3)
if mode == "hang":
    while True:
        time.sleep(3600)
time.sleep(float(os.environ.get("FAKE_VLLM_DELAY", "2")))
port = int(sys.argv[sys.argv.index("--port") + 1])

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", port), Health)
print("fake vllm: Application startup complete.", flush=True)
server.serve_forever()
'''


@dataclass
class Launch:
    proc: subprocess.Popen[bytes]
    log_path: Path
    record_path: Path
    http_port: int
    vlm_port: int
    log_file: Any = field(repr=False)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def record(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.record_path.read_text())
        return data

    def wait_for(
        self, check: Callable[[], bool], timeout: float, what: str, after_exit: bool = False
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            if not after_exit and self.proc.poll() is not None:
                break  # a dead daemon will not bring the awaited thing any more
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; output:\n{self.output()}")

    def wait_for_text(self, text: str, timeout: float = 15.0, after_exit: bool = False) -> None:
        self.wait_for(lambda: text in self.output(), timeout, repr(text), after_exit)

    def health_status(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/health", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except (OSError, ValueError):
            return None


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def path_without(program: str) -> str:
    """The current PATH minus directories holding a real `program`."""
    dirs = os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
    return os.pathsep.join(d for d in dirs if d and not (Path(d) / program).exists())


@contextlib.contextmanager
def launch(
    tmp_path: Path,
    *,
    gpu: bool,
    server: str | None = "vllm",
    mode: str = "crash",
    **env_overrides: str,
) -> Iterator[Launch]:
    fakes = tmp_path / "fakebin"
    fakes.mkdir()
    if gpu:
        write_executable(fakes / "nvidia-smi", FAKE_NVIDIA_SMI)
    if server is not None:
        write_executable(fakes / server, FAKE_VLM_SERVER.format(python=sys.executable))
    http_port, vlm_port = free_ports(2)
    record = tmp_path / "vlm-record.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDRU_", "WATCHER_"))}
    env.update({
        "PATH": f"{fakes}{os.pathsep}{path_without('nvidia-smi')}",
        "WATCHER_PYTHON": sys.executable,
        "WATCHER_ENGINE": "cpu",
        "WATCHER_HTTP_HOST": "127.0.0.1",
        "WATCHER_HTTP_PORT": str(http_port),
        "WATCHER_VLM_PORT": str(vlm_port),
        "WATCHER_VLM_HEALTH_INTERVAL": "0.3",
        "WATCHER_MODEL_CACHE": str(tmp_path / "models"),
        "WATCHER_LOG_FORMAT": "json",
        "WATCHER_DRAIN_SECONDS": "5",
        # Nothing listens on port 9: S3 stays unreachable, and /health must not care.
        "CLOUDRU_S3_ENDPOINT": "http://127.0.0.1:9",
        "CLOUDRU_S3_BUCKET": "documents",
        "CLOUDRU_S3_ACCESS_KEY": "tenant-id:key-id",
        "CLOUDRU_S3_SECRET_KEY": "dummy-secret",
        "WATCHER_S3_CONNECT_TIMEOUT": "1",
        "WATCHER_S3_MAX_ATTEMPTS": "1",
        "FAKE_VLLM_MODE": mode,
        "FAKE_VLLM_RECORD": str(record),
    })
    env.update(env_overrides)
    log_path = tmp_path / "container.log"
    # A file, not a pipe: the background VLM server keeps the inherited stdout open, and
    # a reader waiting for EOF on a pipe would wait for it too.
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [str(START_SH)], env=env, cwd=REPO, stdin=subprocess.DEVNULL,
        stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        yield Launch(proc, log_path, record, http_port, vlm_port, log_file)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        log_file.close()


def listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[1].rsplit(":", 1)[1] == f"{port:04X}" and cols[3] == "0A":
                    inodes.add(cols[9])
    return inodes


def owns_listening_socket(pid: int, port: int) -> bool:
    wanted = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) in wanted:
                return True
    return False


def assert_daemon_serves_then_exits_cleanly(run: Launch) -> None:
    run.wait_for(lambda: run.health_status() == 200, 20.0, "GET /health answering 200")
    # exec kept the PID: the process we started is now the daemon and owns the socket.
    cmdline = Path(f"/proc/{run.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert b"watcher" in cmdline and b"run" in cmdline, cmdline
    assert owns_listening_socket(run.proc.pid, run.http_port)
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=35) == 0, run.output()
    assert '"daemon_stopped"' in run.output()


def assert_fake_started_with_expected_flags(run: Launch, model_cache: Path) -> dict[str, Any]:
    run.wait_for(run.record_path.exists, 15.0, "the fake VLM server to start")
    record = run.record()
    argv: list[str] = record["argv"]
    served, source = PADDLEOCR_VL_MODELS[DEFAULT_PIPELINE_VERSION]
    assert argv[1:3] == ["serve", source], argv
    assert "--trust-remote-code" in argv
    assert argv[argv.index("--served-model-name") + 1] == served
    assert argv[argv.index("--port") + 1] == str(run.vlm_port)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    for flag in ("--no-enable-prefix-caching", "--mm-processor-cache-gb",
                 "--gpu-memory-utilization", "--max-num-batched-tokens", "--max-num-seqs"):
        assert flag in argv, flag
    # Weights fetched at start go to the cache volume.
    assert record["hf_home"] == str(model_cache / "huggingface")
    assert record["paddlex_home"] == str(model_cache / "paddlex")
    return record


def test_vlm_server_that_crashes_at_once_is_logged_and_the_daemon_runs(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=True, mode="crash") as run:
        assert_fake_started_with_expected_flags(run, tmp_path / "models")
        run.wait_for_text("start.sh: WARNING vlm server exited with code 3")
        out = run.output()
        assert "[vlm] fake vllm starting" in out
        assert "[vlm] fake vllm: RuntimeError: CUDA out of memory" in out
        assert_daemon_serves_then_exits_cleanly(run)


def test_vlm_server_that_hangs_does_not_block_the_daemon(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=True, mode="hang", WATCHER_VLM_STARTUP_TIMEOUT="2") as run:
        record = assert_fake_started_with_expected_flags(run, tmp_path / "models")
        # The daemon is up while the VLM server has not answered at all.
        run.wait_for(lambda: run.health_status() == 200, 20.0, "GET /health answering 200")
        assert "vlm server healthy" not in run.output()
        run.wait_for_text("start.sh: WARNING vlm server not healthy after 2 s")
        assert "[vlm] fake vllm starting" in run.output()
        assert_daemon_serves_then_exits_cleanly(run)
        # Once the daemon is gone, start.sh's supervisor stops the server it started.
        run.wait_for_text("vlm server stopped with code", timeout=10.0, after_exit=True)
        assert not pid_alive(record["pid"])


def test_vlm_server_that_becomes_healthy_late_is_reported(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=True, mode="late", FAKE_VLLM_DELAY="2") as run:
        record = assert_fake_started_with_expected_flags(run, tmp_path / "models")
        run.wait_for_text(f"start.sh: vlm server healthy on port {run.vlm_port}")
        out = run.output()
        assert "[vlm] fake vllm: Application startup complete." in out
        assert "WARNING" not in out
        assert_daemon_serves_then_exits_cleanly(run)
        run.wait_for_text("vlm server stopped with code", timeout=10.0, after_exit=True)
        assert not pid_alive(record["pid"])


def test_without_a_gpu_only_the_daemon_starts(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=False, mode="late") as run:
        assert_daemon_serves_then_exits_cleanly(run)
        out = run.output()
        assert "start.sh: no VLM server started: no GPU: nvidia-smi not found" in out
        assert not run.record_path.exists(), "the VLM server started without a GPU"
        assert "[vlm]" not in out


def test_vlm_server_off_skips_it_even_with_a_gpu(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=True, mode="late", WATCHER_VLM_SERVER="off") as run:
        assert_daemon_serves_then_exits_cleanly(run)
        assert "start.sh: no VLM server started: WATCHER_VLM_SERVER=off" in run.output()
        assert not run.record_path.exists()


def test_missing_vllm_command_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=True, server=None) as run:
        assert_daemon_serves_then_exits_cleanly(run)
        assert "start.sh: WARNING vlm server not started: command 'vllm' not found" in run.output()


def test_genai_server_backend_gets_paddlex_arguments(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=True, server="paddleocr", mode="crash",
                WATCHER_VLM_BACKEND="genai_server", WATCHER_VLM_EXTRA_ARGS="--extra  one",
                TMPDIR=str(tmp_path)) as run:
        run.wait_for(run.record_path.exists, 15.0, "the fake genai server to start")
        argv = run.record()["argv"]
        assert argv[1] == "genai_server"
        assert argv[argv.index("--model_name") + 1] == PADDLEOCR_VL_MODELS[DEFAULT_PIPELINE_VERSION][0]
        assert argv[argv.index("--backend") + 1] == "vllm"
        assert argv[argv.index("--port") + 1] == str(run.vlm_port)
        assert argv[-2:] == ["--extra", "one"]
        config = Path(argv[argv.index("--backend_config") + 1]).read_text()
        assert "gpu-memory-utilization: 0.5" in config
        run.wait_for_text("start.sh: WARNING vlm server exited with code 3")
        assert_daemon_serves_then_exits_cleanly(run)


@pytest.mark.parametrize("version", sorted(PADDLEOCR_VL_MODELS))
def test_each_pipeline_version_serves_the_model_the_daemon_asks_for(
    tmp_path: Path, version: str
) -> None:
    """start.sh and the daemon's settings derive the same served name and weights."""
    served, source = PADDLEOCR_VL_MODELS[version]
    with launch(tmp_path, gpu=True, mode="crash", WATCHER_PIPELINE_VERSION=version) as run:
        run.wait_for(run.record_path.exists, 15.0, "the fake VLM server to start")
        argv = run.record()["argv"]
    assert argv[1:3] == ["serve", source]
    assert argv[argv.index("--served-model-name") + 1] == served
    settings = Settings(CLOUDRU_S3_ENDPOINT="http://s3", CLOUDRU_S3_BUCKET="bucket",  # type: ignore[call-arg]
                        CLOUDRU_S3_ACCESS_KEY="t:k", CLOUDRU_S3_SECRET_KEY="secret",
                        WATCHER_ENGINE="paddleocr-vl", WATCHER_PIPELINE_VERSION=version)
    assert settings.vlm_model == served

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
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import pid_alive
from waiting import eventually_sync

from watcher.cli.embedded import free_ports
from watcher.core.settings import DEFAULT_PIPELINE_VERSION, PADDLEOCR_VL_MODELS, Settings

REPO = Path(__file__).resolve().parents[1]
START_SH = REPO / "start.sh"

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]  # start.sh in subprocesses

FAKE_NVIDIA_SMI = """#!/bin/sh
# FAKE nvidia-smi: a protocol-boundary stand-in (no GPU here); lists one GPU like `-L` does.
echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-fake)"
"""

FAKE_VLM_SERVER = '''#!{python}
"""FAKE VLM server (stands in for `vllm serve` / `paddleocr genai_server`).

A protocol-boundary fake: there is no GPU here, so it only records how start.sh called it
(one JSON line per start) and then behaves as the next step of FAKE_VLLM_PLAN says, a
comma-separated list consumed one step per start (the last step repeats):
  crash     print an out-of-memory line and exit 3 at once
  hang      never serve
  late      serve 200 on /health at --port after FAKE_VLLM_DELAY seconds, forever
  live:S    serve at once, then exit 4 after S seconds
"""
import http.server, json, os, sys, threading, time

record = os.environ["FAKE_VLLM_RECORD"]
with open(record, "a+") as f:
    f.seek(0)
    starts = sum(1 for _ in f)
    f.write(json.dumps({{"argv": sys.argv, "pid": os.getpid(),
                        "hf_home": os.environ.get("HF_HOME"),
                        "paddlex_home": os.environ.get("PADDLE_PDX_CACHE_HOME")}}) + "\\n")
plan = os.environ["FAKE_VLLM_PLAN"].split(",")
step = plan[min(starts, len(plan) - 1)]
print(f"fake vllm starting ({{step}})", flush=True)
if step == "crash":
    print("fake vllm: RuntimeError: CUDA out of memory", flush=True)
    sys.exit(3)
if step == "hang":
    while True:
        time.sleep(3600)
lifetime = None
if step.startswith("live:"):
    lifetime = float(step.split(":", 1)[1])
else:
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
if lifetime is None:
    server.serve_forever()
threading.Thread(target=server.serve_forever, daemon=True).start()
time.sleep(lifetime)
print("fake vllm: engine core died", flush=True)
os._exit(4)
'''

# start.sh's restart line: code, how long the run lasted, restart number, delay.
RESTART_LINE = re.compile(
    r"start\.sh: WARNING vlm server exited with code (\d+) after ([\d.]+) s; "
    r"restart (\d+) in ([\d.]+) s"
)


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

    def records(self) -> list[dict[str, Any]]:
        """One entry per start of the fake VLM server, oldest first."""
        if not self.record_path.exists():
            return []
        records = []
        for line in self.record_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line still being written
                records.append(json.loads(line))
        return records

    def record(self) -> dict[str, Any]:
        return self.records()[0]

    def restarts(self) -> list[tuple[int, float, int, float]]:
        """(exit code, seconds it ran, restart number, delay) of each logged restart."""
        return [(int(code), float(ran), int(n), float(delay))
                for code, ran, n, delay in RESTART_LINE.findall(self.output())]

    def attempts(self) -> list[int]:
        """The attempt numbers of the VLM server starts start.sh announced."""
        return [int(n) for n in re.findall(r"vlm server started \(pid \d+, attempt (\d+)",
                                           self.output())]

    def daemon_env(self) -> dict[str, str]:
        """The environment the daemon (this PID after start.sh's exec) was given."""
        raw = Path(f"/proc/{self.proc.pid}/environ").read_bytes()
        pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
        return {k.decode(): v.decode(errors="replace") for k, v in pairs}

    def processes(self) -> list[int]:
        """The processes still running in start.sh's process group (`launch` starts it as a
        session leader): the daemon, the VLM supervisor and everything they started. Zombies
        do not count: orphans are reaped by PID 1, which may not do it here."""
        left = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    state, _ppid, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
                    if int(group) == self.proc.pid and state != "Z":
                        left.append(int(entry.name))
        return left

    def wait_for(
        self, check: Callable[[], bool], timeout: float, what: str, after_exit: bool = False
    ) -> None:
        def holds() -> bool:
            if check():
                return True
            if not after_exit and self.proc.poll() is not None:
                # A dead daemon will not bring the awaited thing any more.
                raise AssertionError(f"the daemon exited with {self.proc.returncode} before {what}")
            return False

        try:
            eventually_sync(holds, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; output:\n{self.output()}") from None

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
    plan: str = "crash",
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
        "FAKE_VLLM_PLAN": plan,
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
    run.wait_for(lambda: bool(run.records()), 15.0, "the fake VLM server to start")
    record = run.record()
    argv: list[str] = record["argv"]
    served, source = PADDLEOCR_VL_MODELS[DEFAULT_PIPELINE_VERSION]
    assert argv[1:3] == ["serve", source], argv
    assert "--trust-remote-code" in argv
    assert argv[argv.index("--served-model-name") + 1] == served
    assert argv[argv.index("--port") + 1] == str(run.vlm_port)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    # A bounded context: vLLM sizes its KV cache for it, and the model's own 131072 does
    # not fit small cards.
    assert int(argv[argv.index("--max-model-len") + 1]) > 0
    for flag in ("--no-enable-prefix-caching", "--mm-processor-cache-gb",
                 "--gpu-memory-utilization", "--max-num-batched-tokens", "--max-num-seqs"):
        assert flag in argv, flag
    # Weights fetched at start go to the cache volume.
    assert record["hf_home"] == str(model_cache / "huggingface")
    assert record["paddlex_home"] == str(model_cache / "paddlex")
    return record


def assert_no_fake_server_runs(run: Launch) -> None:
    """Every VLM server start.sh started is gone (the daemon has exited)."""
    pids = [r["pid"] for r in run.records()]
    assert pids
    run.wait_for(lambda: not any(pid_alive(p) for p in pids), 15.0,
                 "the VLM servers to be stopped", after_exit=True)


def test_vlm_server_that_crashes_at_once_is_logged_and_the_daemon_runs(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=True, plan="crash") as run:
        assert_fake_started_with_expected_flags(run, tmp_path / "models")
        run.wait_for_text("start.sh: WARNING vlm server exited with code 3")
        out = run.output()
        assert "[vlm] fake vllm starting" in out
        assert "[vlm] fake vllm: RuntimeError: CUDA out of memory" in out
        assert_daemon_serves_then_exits_cleanly(run)


def test_vlm_server_that_exits_is_restarted_with_backoff(tmp_path: Path) -> None:
    """Each exit is logged with its code and restart number; the delay doubles to the cap."""
    with launch(tmp_path, gpu=True, plan="crash", WATCHER_VLM_RESTART_DELAY="0.2",
                WATCHER_VLM_RESTART_MAX_DELAY="0.8") as run:
        # Every restart is a new server process, announced with its attempt number.
        run.wait_for(lambda: len(run.attempts()) >= 6 and len(run.records()) >= 6, 30.0,
                     "five restarts")
        restarts = run.restarts()
        assert [code for code, _, _, _ in restarts] == [3] * len(restarts)
        assert [n for _, _, n, _ in restarts] == list(range(1, len(restarts) + 1))
        assert [delay for _, _, _, delay in restarts[:5]] == [0.2, 0.4, 0.8, 0.8, 0.8]
        assert run.attempts()[:6] == [1, 2, 3, 4, 5, 6]
        assert len({r["pid"] for r in run.records()}) >= 6
        # The daemon never stopped for it, and stopping the daemon ends the restarts.
        assert run.proc.poll() is None
        assert_daemon_serves_then_exits_cleanly(run)
        run.wait_for(lambda: "after the daemon exited" in run.output()
                     or "vlm server not restarted: the daemon exited" in run.output(),
                     10.0, "the supervisor to notice the daemon's exit", after_exit=True)
        assert_no_fake_server_runs(run)
        starts = len(run.records())
        # Nothing starts the server again once the daemon is gone: the supervisor has ended,
        # and with it everything start.sh started.
        run.wait_for(lambda: not run.processes(), 15.0, "start.sh's processes to end", after_exit=True)
        assert len(run.records()) == starts


def test_a_run_that_stayed_up_resets_the_backoff(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=True, plan="crash,crash,live:1.5,crash",
                WATCHER_VLM_RESTART_DELAY="0.2", WATCHER_VLM_RESTART_MAX_DELAY="10",
                WATCHER_VLM_RESTART_RESET_AFTER="1") as run:
        run.wait_for(lambda: len(run.restarts()) >= 5, 30.0, "five restarts")
        restarts = run.restarts()
        # crash, crash: 0.2, 0.4; the third run served (healthy) for 1.5 s and died with
        # code 4: back to 0.2; then crashes again double from there.
        assert [(code, delay) for code, _, _, delay in restarts[:5]] == [
            (3, 0.2), (3, 0.4), (4, 0.2), (3, 0.4), (3, 0.8)]
        assert restarts[2][1] >= 1.0
        assert f"start.sh: vlm server healthy on port {run.vlm_port}" in run.output()
        assert_daemon_serves_then_exits_cleanly(run)
        assert_no_fake_server_runs(run)


def test_vlm_server_restarted_until_it_serves_then_stopped_with_the_daemon(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=True, plan="crash,crash,late", FAKE_VLLM_DELAY="0.5",
                WATCHER_VLM_RESTART_DELAY="0.2") as run:
        run.wait_for_text(f"start.sh: vlm server healthy on port {run.vlm_port}", timeout=30.0)
        assert [n for _, _, n, _ in run.restarts()] == [1, 2]
        serving = run.records()[-1]["pid"]
        assert pid_alive(serving)
        assert run.daemon_env()["WATCHER_VLM_MANAGED"] == "1"
        assert_daemon_serves_then_exits_cleanly(run)
        run.wait_for_text("vlm server stopped with code", timeout=15.0, after_exit=True)
        assert_no_fake_server_runs(run)
        assert len(run.restarts()) == 2


def test_restart_off_leaves_a_dead_vlm_server_dead(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=True, plan="crash", WATCHER_VLM_RESTART="off",
                WATCHER_VLM_RESTART_DELAY="0.1") as run:
        run.wait_for_text("not restarted (WATCHER_VLM_RESTART=off)")
        assert_daemon_serves_then_exits_cleanly(run)
        # Once start.sh's processes, the supervisor among them, have ended, nothing can start
        # the server again: the count is final.
        run.wait_for(lambda: not run.processes(), 15.0, "start.sh's processes to end", after_exit=True)
        assert len(run.records()) == 1
        assert run.restarts() == []


def test_vlm_server_that_hangs_does_not_block_the_daemon(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=True, plan="hang", WATCHER_VLM_STARTUP_TIMEOUT="2") as run:
        record = assert_fake_started_with_expected_flags(run, tmp_path / "models")
        # The daemon is up while the VLM server has not answered at all.
        run.wait_for(lambda: run.health_status() == 200, 20.0, "GET /health answering 200")
        assert "vlm server healthy" not in run.output()
        run.wait_for_text("start.sh: WARNING vlm server not healthy after 2 s")
        assert "[vlm] fake vllm starting" in run.output()
        # A server that hangs is not one that exited: nothing restarts it.
        assert run.restarts() == []
        assert_daemon_serves_then_exits_cleanly(run)
        # Once the daemon is gone, start.sh's supervisor stops the server it started.
        run.wait_for_text("vlm server stopped with code", timeout=10.0, after_exit=True)
        assert not pid_alive(record["pid"])


def test_vlm_server_that_becomes_healthy_late_is_reported(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=True, plan="late", FAKE_VLLM_DELAY="2") as run:
        record = assert_fake_started_with_expected_flags(run, tmp_path / "models")
        run.wait_for_text(f"start.sh: vlm server healthy on port {run.vlm_port}")
        out = run.output()
        assert "[vlm] fake vllm: Application startup complete." in out
        assert "WARNING" not in out
        # The daemon is told that the VLM server is this container's to keep.
        assert run.daemon_env()["WATCHER_VLM_MANAGED"] == "1"
        assert_daemon_serves_then_exits_cleanly(run)
        run.wait_for_text("vlm server stopped with code", timeout=10.0, after_exit=True)
        assert not pid_alive(record["pid"])


def test_without_a_gpu_only_the_daemon_starts(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=False, plan="late", WATCHER_VLM_MANAGED="1") as run:
        run.wait_for(lambda: run.health_status() == 200, 20.0, "GET /health answering 200")
        # Whatever the environment said, no server here is the daemon's to wait for.
        assert run.daemon_env()["WATCHER_VLM_MANAGED"] == "0"
        assert_daemon_serves_then_exits_cleanly(run)
        out = run.output()
        assert "start.sh: no VLM server started: no GPU: nvidia-smi not found" in out
        assert not run.record_path.exists(), "the VLM server started without a GPU"
        assert "[vlm]" not in out


def test_vlm_server_off_skips_it_even_with_a_gpu(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=True, plan="late", WATCHER_VLM_SERVER="off") as run:
        assert_daemon_serves_then_exits_cleanly(run)
        assert "start.sh: no VLM server started: WATCHER_VLM_SERVER=off" in run.output()
        assert not run.record_path.exists()


def test_missing_vllm_command_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=True, server=None) as run:
        run.wait_for(lambda: run.health_status() == 200, 20.0, "GET /health answering 200")
        assert run.daemon_env()["WATCHER_VLM_MANAGED"] == "0"
        assert_daemon_serves_then_exits_cleanly(run)
        assert "start.sh: WARNING vlm server not started: command 'vllm' not found" in run.output()


def test_genai_server_backend_gets_paddlex_arguments(tmp_path: Path) -> None:
    with launch(tmp_path, gpu=True, server="paddleocr", plan="crash",
                WATCHER_VLM_BACKEND="genai_server", WATCHER_VLM_EXTRA_ARGS="--extra  one",
                TMPDIR=str(tmp_path)) as run:
        run.wait_for(lambda: bool(run.records()), 15.0, "the fake genai server to start")
        argv = run.record()["argv"]
        assert argv[1] == "genai_server"
        assert argv[argv.index("--model_name") + 1] == PADDLEOCR_VL_MODELS[DEFAULT_PIPELINE_VERSION][0]
        assert argv[argv.index("--backend") + 1] == "vllm"
        assert argv[argv.index("--port") + 1] == str(run.vlm_port)
        assert argv[-2:] == ["--extra", "one"]
        config = Path(argv[argv.index("--backend_config") + 1]).read_text()
        assert "gpu-memory-utilization: 0.5" in config
        assert "max-model-len: " in config
        run.wait_for_text("start.sh: WARNING vlm server exited with code 3")
        assert_daemon_serves_then_exits_cleanly(run)


@pytest.mark.parametrize("version", sorted(PADDLEOCR_VL_MODELS))
def test_each_pipeline_version_serves_the_model_the_daemon_asks_for(
    tmp_path: Path, version: str
) -> None:
    """start.sh and the daemon's settings derive the same served name and weights."""
    served, source = PADDLEOCR_VL_MODELS[version]
    with launch(tmp_path, gpu=True, plan="crash", WATCHER_PIPELINE_VERSION=version) as run:
        run.wait_for(lambda: bool(run.records()), 15.0, "the fake VLM server to start")
        argv = run.record()["argv"]
    assert argv[1:3] == ["serve", source]
    assert argv[argv.index("--served-model-name") + 1] == served
    settings = Settings(CLOUDRU_S3_ENDPOINT="http://s3", CLOUDRU_S3_BUCKET="bucket",  # type: ignore[call-arg]
                        CLOUDRU_S3_ACCESS_KEY="t:k", CLOUDRU_S3_SECRET_KEY="secret",
                        WATCHER_ENGINE="paddleocr-vl", WATCHER_PIPELINE_VERSION=version)
    assert settings.vlm_model == served


@pytest.mark.parametrize(
    ("setting", "value"),
    [("WATCHER_VLM_RESTART_DELAY", "soon"), ("WATCHER_VLM_RESTART", "maybe")],
)
def test_a_bad_restart_setting_is_a_warning_and_the_default(
    tmp_path: Path, setting: str, value: str
) -> None:
    with launch(tmp_path, gpu=True, plan="crash", **{setting: value}) as run:
        run.wait_for_text(f"start.sh: WARNING {setting}")
        run.wait_for(lambda: len(run.restarts()) >= 1, 15.0, "a restart")
        assert run.restarts()[0][3] == 5.0  # the documented default first delay
        assert_daemon_serves_then_exits_cleanly(run)

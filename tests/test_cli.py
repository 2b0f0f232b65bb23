"""The real command line: configuration errors, JSON logs, /health under load, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from docgen import make_image, make_pdf
from waiting import eventually_sync

from watcher.cli.embedded import SeaweedS3, free_ports
from watcher.core.settings import Settings, settings_table

pytestmark = pytest.mark.e2e  # the real command line in subprocesses

SECRET = "very-secret-value-9f3a7c"


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDRU_", "WATCHER_"))}
    env.update(extra)
    return env


def run_cli(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "watcher", "run"], env=env, capture_output=True,
                          text=True, timeout=60)


def test_missing_settings_stop_start_up_with_exit_code_2() -> None:
    proc = run_cli(base_env())
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    for name in ("CLOUDRU_S3_ENDPOINT", "CLOUDRU_S3_BUCKET", "CLOUDRU_S3_ACCESS_KEY",
                 "CLOUDRU_S3_SECRET_KEY"):
        assert any(name in line and "required" in line for line in lines), lines
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("name", "value", "phrase"),
    [
        ("WATCHER_HTTP_PORT", "eighty", "integer"),
        ("WATCHER_POLL_INTERVAL", "-1", "greater than 0"),
        ("WATCHER_ENGINE", "tesseract", "cpu"),
        ("CLOUDRU_S3_ENDPOINT", "storage.example:443", "http"),
        ("CLOUDRU_S3_SECRET_KEY", "   ", "empty"),
        ("WATCHER_OUTPUT_PREFIX", "input/results/", "overlap"),
    ],
)
def test_a_bad_value_names_the_variable_and_never_echoes_secrets(
    name: str, value: str, phrase: str
) -> None:
    env = base_env(
        CLOUDRU_S3_ENDPOINT="http://127.0.0.1:9", CLOUDRU_S3_BUCKET="documents",
        CLOUDRU_S3_ACCESS_KEY="tenant:key-id-1234", CLOUDRU_S3_SECRET_KEY=SECRET,
    )
    env[name] = value
    proc = run_cli(env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert (name in lines[0] or name == "WATCHER_OUTPUT_PREFIX") and phrase in lines[0], lines
    assert SECRET not in proc.stderr + proc.stdout


def http_get(url: str) -> tuple[int, bytes, float]:
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read(), time.perf_counter() - started
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), time.perf_counter() - started


def test_daemon_process_serves_health_under_load_and_exits_0_on_sigterm(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    s3.put_object(Bucket=bucket, Key="input/big.pdf",
                  Body=make_pdf([[f"Busy page {i}", "lots of text here"] for i in range(40)]))
    (port,) = free_ports(1)
    env = base_env(
        CLOUDRU_S3_ENDPOINT=weed.endpoint, CLOUDRU_S3_BUCKET=bucket,
        CLOUDRU_S3_ACCESS_KEY=weed.access_key, CLOUDRU_S3_SECRET_KEY=weed.secret_key,
        WATCHER_HTTP_PORT=str(port), WATCHER_POLL_INTERVAL="0.5", WATCHER_RENDER_DPI="150",
        WATCHER_DRAIN_SECONDS="60",
    )
    proc = subprocess.Popen([sys.executable, "-m", "watcher", "run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def answered() -> tuple[int, bytes, float] | None:
            try:
                return http_get(f"{base}/health")
            except OSError:
                return None

        status, body, _ = eventually_sync(answered, 30, "/health to answer")
        assert status == 200 and json.loads(body)["status"] == "healthy"
        # While pages are being recognised, /health keeps answering.
        latencies: list[float] = []
        saw_inflight = False

        def twenty_answers_while_busy() -> bool:
            nonlocal saw_inflight
            status, body, seconds = http_get(f"{base}/health")
            assert status == 200
            health = json.loads(body)
            saw_inflight |= health["inflight_documents"] > 0
            if saw_inflight:
                latencies.append(seconds)
            return len(latencies) >= 20

        eventually_sync(twenty_answers_while_busy, 120, "20 answers from /health while busy", every=0.05)
        assert saw_inflight and len(latencies) >= 20
        metrics = http_get(f"{base}/metrics")[1].decode()
        assert "watcher_inflight_documents 1.0" in metrics
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    for expected in ("http_listening", "engine_ready", "document_fetched", "document_decoded",
                     "document_done", "drain_started", "daemon_stopped"):
        assert expected in names, names
    done = next(e for e in events if e["event"] == "document_done")
    assert done["key"] == "input/big.pdf" and done["pages"] == 40 and "etag" in done
    assert weed.secret_key not in output and weed.access_key not in output
    # The in-flight document was finished during the drain, not dropped.
    assert s3.head_object(Bucket=bucket, Key="output/big.pdf.json")
    print(f"/health latency while busy: max {max(latencies) * 1000:.1f} ms")


def test_run_once_processes_what_is_pending_and_exits_with_what_happened(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    env = base_env(
        CLOUDRU_S3_ENDPOINT=weed.endpoint, CLOUDRU_S3_BUCKET=bucket,
        CLOUDRU_S3_ACCESS_KEY=weed.access_key, CLOUDRU_S3_SECRET_KEY=weed.secret_key,
        WATCHER_HTTP_PORT="0", WATCHER_HTTP_HOST="127.0.0.1", WATCHER_POLL_INTERVAL="60",
    )
    s3.put_object(Bucket=bucket, Key="input/a.pdf", Body=make_pdf([["Backfill page one"]]))
    s3.put_object(Bucket=bucket, Key="input/b.pdf", Body=make_pdf([["Backfill page two"]]))
    command = [sys.executable, "-m", "watcher", "run", "--once"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    # Exits on its own (the poll interval is a minute): every document has its result.
    assert first.returncode == 0, first.stderr
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="output/")["Contents"]}
    assert {"output/a.pdf.json", "output/b.pdf.json"} <= keys

    assert "watcher: --once: 2 done, 0 error records" in first.stderr, first.stderr

    s3.put_object(Bucket=bucket, Key="input/c.png", Body=b"\x89PNG\r\n\x1a\n not really")
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    # The bad one got its error record, and the exit code says that not all went well.
    assert second.returncode == 1, second.stderr
    record = json.loads(s3.get_object(Bucket=bucket, Key="output/c.png.error.json")["Body"].read())
    assert "watcher: --once: 0 done, 1 error record" in second.stderr, second.stderr
    # The failure with its code and where its error record is.
    assert f"watcher: error  input/c.png → output/c.png.error.json  {record['error']['code']}" \
        in second.stderr, second.stderr
    assert "input/a.pdf" not in second.stderr  # done before: skipped, not redone

    # A rerun reads nothing, but does not pretend all is well: the error record stands.
    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert third.returncode == 1, third.stderr
    assert "watcher: --once: 0 done, 0 error records" in third.stderr, third.stderr
    assert "1 source(s) already had an error record" in third.stderr
    assert "watcher:   input/c.png → output/c.png.error.json" in third.stderr

    # Fixed by a new version: read, done, exit 0 again.
    s3.put_object(Bucket=bucket, Key="input/c.png", Body=make_image(["Fixed upload"], "PNG"))
    fourth = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert fourth.returncode == 0, fourth.stderr
    assert "watcher: --once: 1 done, 0 error records" in fourth.stderr, fourth.stderr
    assert "already had an error record" not in fourth.stderr


def test_run_once_exits_2_when_s3_cannot_be_listed() -> None:
    (port,) = free_ports(1)  # nothing listens there
    env = base_env(
        CLOUDRU_S3_ENDPOINT=f"http://127.0.0.1:{port}", CLOUDRU_S3_BUCKET="documents",
        CLOUDRU_S3_ACCESS_KEY="tenant:key", CLOUDRU_S3_SECRET_KEY=SECRET,
        WATCHER_HTTP_PORT="0", WATCHER_HTTP_HOST="127.0.0.1", WATCHER_S3_MAX_ATTEMPTS="1",
    )
    proc = subprocess.run([sys.executable, "-m", "watcher", "run", "--once"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"S3 could not be listed at http://127.0.0.1:{port}" in proc.stderr
    assert "watcher check" in proc.stderr and SECRET not in proc.stderr + proc.stdout


def test_a_taken_health_port_names_the_setting_to_change() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = base_env(
            CLOUDRU_S3_ENDPOINT="http://127.0.0.1:9", CLOUDRU_S3_BUCKET="documents",
            CLOUDRU_S3_ACCESS_KEY="tenant:key", CLOUDRU_S3_SECRET_KEY=SECRET,
            WATCHER_HTTP_HOST="127.0.0.1", WATCHER_HTTP_PORT=str(port),
        )
        procs = [run_cli(env), subprocess.run([sys.executable, "-m", "watcher", "run", "--once"],
                                              env=env, capture_output=True, text=True, timeout=60)]
    for proc in procs:  # a start-up problem: exit 2 in every mode (1 is about documents)
        assert proc.returncode == 2, proc.stderr
        assert f"127.0.0.1:{port}" in proc.stderr and "WATCHER_HTTP_PORT" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and SECRET not in proc.stderr + proc.stdout


def test_every_configuration_problem_is_reported_in_one_round() -> None:
    env = base_env(CLOUDRU_S3_BUCKET="documents", CLOUDRU_S3_SECRET_KEY=SECRET,
                   WATCHER_HTTP_PORT="eighty", WATCHER_OUTPUT_PREFIX="input/results/",
                   WATCHER_SHARD_INDEX="3")
    proc = run_cli(env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    # Missing, malformed and contradictory settings together, one line each.
    for name in ("CLOUDRU_S3_ENDPOINT", "CLOUDRU_S3_ACCESS_KEY", "WATCHER_HTTP_PORT",
                 "WATCHER_OUTPUT_PREFIX must not overlap", "WATCHER_SHARD_INDEX must be below"):
        assert sum(name in line for line in lines) == 1, (name, lines)
    assert len(lines) == 5 and SECRET not in proc.stderr


def test_run_help_lists_every_setting_with_its_default_and_meaning() -> None:
    proc = subprocess.run([sys.executable, "-m", "watcher", "run", "--help"], env=base_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for name, info in Settings.model_fields.items():
        shown = "(required)" if info.is_required() else "(default: "
        assert f"  {info.alias} {shown}" in proc.stdout, name
        assert info.description, f"{name} has no docstring"
    assert "WATCHER_TEXT_LAYER (default: auto)" in proc.stdout
    assert "CLOUDRU_S3_ENDPOINT (required)" in proc.stdout
    # Booleans the way the variables are written.
    assert "WATCHER_STATUS_PAGE (default: false)" in proc.stdout
    assert "WATCHER_ASSETS (default: true)" in proc.stdout
    assert "True" not in proc.stdout and "False" not in proc.stdout


def test_the_readme_settings_tables_are_the_settings_model() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert settings_table() in readme  # regenerate with watcher.core.settings.settings_table()
    assert settings_table(vlm=True) in readme

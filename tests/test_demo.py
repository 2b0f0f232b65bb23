"""`watcher demo --keep-running` as a new user meets it: the printed values are enough for
a real S3 client, one Ctrl-C stops it quietly, and --data-dir/--s3-port keep what was there."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import boto3
import pytest
from botocore.config import Config
from docgen import make_image
from waiting import eventually_sync

from watcher.cli.embedded import free_ports

pytestmark = pytest.mark.e2e  # `watcher demo` in a subprocess

FIELDS = {"endpoint": "S3 endpoint", "bucket": "bucket", "region": "region", "key": "access key",
          "secret": "secret key", "input": "input prefix", "output": "output prefix", "data": "data"}


def start_demo(data_dir: Path, s3_port: int, http_port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDRU_", "WATCHER_", "AWS_"))}
    return subprocess.Popen(
        [sys.executable, "-m", "watcher", "demo", "--keep-running", "--s3-port", str(s3_port),
         "--http-port", str(http_port), "--data-dir", str(data_dir)],
        env={**env, "WATCHER_LOG_LEVEL": "INFO"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )


def read_until(stream: IO[str], marker: str, timeout: float) -> str:
    """The demo's output up to the line holding `marker` (the demo keeps running)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} in the demo's output:\n{''.join(seen)}")


def printed(output: str) -> dict[str, str]:
    values = {}
    for name, label in FIELDS.items():
        match = re.search(rf"^{re.escape(label)}\s+(\S+)", output, re.M)
        assert match, (label, output)
        values[name] = match.group(1)
    return values


def client_for(values: dict[str, str]) -> Any:
    return boto3.client("s3", endpoint_url=values["endpoint"], region_name=values["region"],
                        aws_access_key_id=values["key"], aws_secret_access_key=values["secret"],
                        config=Config(s3={"addressing_style": "path"}))


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)  # one Ctrl-C
    rest, _ = proc.communicate(timeout=60)
    return rest


def test_the_demo_prints_what_a_client_needs_and_one_ctrl_c_stops_it_quietly(tmp_path: Path) -> None:
    s3_port, http_port = free_ports(2)
    data_dir = tmp_path / "demo-data"
    proc = start_demo(data_dir, s3_port, http_port)
    try:
        output = read_until(proc.stdout, "keep running", timeout=240)  # type: ignore[arg-type]
        values = printed(output)
        assert values["endpoint"] == f"http://127.0.0.1:{s3_port}" and values["data"] == str(data_dir)
        assert "kept when the demo stops" in output and "demo-only credentials" in output
        assert f"aws --endpoint-url {values['endpoint']} s3 cp my.pdf s3://{values['bucket']}/" in output
        assert f"rclone copy my.pdf demo:{values['bucket']}/{values['input']}" in output
        # Exactly the printed values reach the demo's S3 with a real client.
        s3 = client_for(values)
        s3.put_object(Bucket=values["bucket"], Key=f"{values['input']}mine/letter.png",
                      Body=make_image(["Dropped in by hand"], "PNG"))
        result_key = f"{values['output']}mine/letter.png.json"

        def fetched() -> Any:
            try:
                return json.loads(s3.get_object(Bucket=values["bucket"], Key=result_key)["Body"].read())
            except s3.exceptions.NoSuchKey:
                return None

        result = eventually_sync(fetched, 60, "a result for the dropped file", every=0.3)
        assert "Dropped in by hand" in result["markdown"]
    finally:
        rest = stop(proc)
    assert proc.returncode == 0, rest
    assert "second_stop_signal_skipping_drain" not in output + rest
    assert "drain_started" in rest and "daemon_stopped" in rest

    # Same port and data directory: what was there is still there.
    again = start_demo(data_dir, s3_port, http_port)
    try:
        output = read_until(again.stdout, "keep running", timeout=240)  # type: ignore[arg-type]
        s3 = client_for(printed(output))
        assert s3.head_object(Bucket="documents", Key=result_key)["ContentLength"] > 0
    finally:
        stop(again)
    assert again.returncode == 0

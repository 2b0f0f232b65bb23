"""`watcher demo`: the whole product on one laptop, with nothing to configure.

Starts an embedded SeaweedFS S3 server, runs the daemon with the CPU engine against it,
uploads the sample documents shipped in the package, and prints where each result landed.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from importlib.resources import files
from pathlib import Path

from watcher.bucket.names import Names
from watcher.cli.embedded import SeaweedS3
from watcher.core.logs import configure_logging
from watcher.core.settings import Settings, load_settings
from watcher.service.daemon import Daemon, running

BUCKET = "documents"


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


def connection_help(server: SeaweedS3, settings: Settings) -> str:
    """Everything an S3 client needs to reach the demo, ready to paste."""
    endpoint, key, secret, region = server.endpoint, server.access_key, server.secret_key, settings.s3_region
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
    ])


async def _demo(server: SeaweedS3, keep_running: bool, http_port: int) -> int:
    settings = load_settings(
        s3_endpoint=server.endpoint, s3_bucket=BUCKET,
        s3_access_key=server.access_key, s3_secret_key=server.secret_key,
        poll_interval=1.0, http_port=http_port, http_host="127.0.0.1",
        log_level=os.environ.get("WATCHER_LOG_LEVEL", "WARNING"), status_page=True,
    )
    configure_logging(settings.log_level, "console", settings.secrets())
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
        print(connection_help(server, settings))
        print(f"status page   http://127.0.0.1:{daemon.http.port}/")
        print(f"health        http://127.0.0.1:{daemon.http.port}/health  (/ready, /metrics)\n",
              flush=True)
        if not await _samples(client, daemon, settings):
            return 1
        if keep_running and not daemon.stop_requested:
            print(f"\nDaemon and S3 keep running: drop files under s3://{BUCKET}/{settings.input_prefix} "
                  "(commands above); Ctrl-C stops.", flush=True)
            await task
    return 0


async def _samples(client: object, daemon: Daemon, settings: Settings) -> bool:
    """Upload the samples and print where each result landed; False when they time out."""
    keys = []
    for path in sample_files():
        key = f"{settings.input_prefix}samples/{path.name}"
        client.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())  # type: ignore[attr-defined]
        keys.append(key)
        print(f"uploaded     s3://{BUCKET}/{key}")
    daemon.poke()
    print("waiting for results (the CPU engine takes about a second a page)...", flush=True)
    names = Names.from_settings(settings)
    pending = {k: (names.result_json(k), names.error_json(k)) for k in keys}
    deadline = time.monotonic() + 300
    while pending and time.monotonic() < deadline and not daemon.stop_requested:
        for key, candidates in list(pending.items()):
            for result_key in candidates:
                if _exists(client, result_key):
                    print(f"\n{key}\n  -> s3://{BUCKET}/{result_key}")
                    if not result_key.endswith(".error.json"):
                        print(f"  -> s3://{BUCKET}/{result_key[:-5]}.md")
                    print(f"     {_summary(client, result_key)}")
                    del pending[key]
                    break
        await asyncio.sleep(0.5)
    if daemon.stop_requested:
        return True
    if pending:
        print(f"\ntimed out waiting for: {', '.join(pending)}")
        return False
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=settings.output_prefix)  # type: ignore[attr-defined]
    print(f"\nAll samples processed; s3://{BUCKET}/{settings.output_prefix} now holds:")
    for item in listing.get("Contents", []):
        print(f"  {item['Size']:>8}  {item['Key']}")
    return True


def _exists(client: object, key: str) -> bool:
    try:
        client.head_object(Bucket=BUCKET, Key=key)  # type: ignore[attr-defined]
    except Exception:
        return False
    return True


def run_demo(keep_running: bool = False, http_port: int = 8081, s3_port: int = 0,
             data_dir: Path | None = None) -> int:
    server = SeaweedS3(buckets=(BUCKET,), data_dir=data_dir, ports={"s3.port": s3_port} if s3_port else {})
    with server:
        return asyncio.run(_demo(server, keep_running, http_port))

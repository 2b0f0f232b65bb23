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

from watcher.daemon import Daemon, running
from watcher.embedded import SeaweedS3
from watcher.layout import Layout
from watcher.logs import configure_logging
from watcher.settings import load_settings

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


async def _demo(server: SeaweedS3, keep_running: bool, http_port: int) -> int:
    settings = load_settings(
        s3_endpoint=server.endpoint, s3_bucket=BUCKET,
        s3_access_key=server.access_key, s3_secret_key=server.secret_key,
        poll_interval=1.0, http_port=http_port, http_host="127.0.0.1",
        log_level=os.environ.get("WATCHER_LOG_LEVEL", "WARNING"),
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
        print(f"S3 endpoint  {server.endpoint}  bucket '{BUCKET}'")
        print(f"health       http://127.0.0.1:{daemon.http.port}/health  (/ready, /metrics)")
        keys = []
        for path in sample_files():
            key = f"{settings.input_prefix}samples/{path.name}"
            client.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
            keys.append(key)
            print(f"uploaded     s3://{BUCKET}/{key}")
        daemon.poke()
        print("waiting for results (the CPU engine takes about a second a page)...")
        layout = Layout.from_settings(settings)
        pending = {k: (layout.result_json(k), layout.error_json(k)) for k in keys}
        deadline = time.monotonic() + 300
        while pending and time.monotonic() < deadline:
            for key, candidates in list(pending.items()):
                for result_key in candidates:
                    if _exists(client, result_key):
                        print(f"\n{key}\n  -> s3://{BUCKET}/{result_key}")
                        if result_key.endswith(".error.json"):
                            print(f"     {_summary(client, result_key)}")
                        else:
                            print(f"  -> s3://{BUCKET}/{result_key[:-5]}.md")
                            print(f"     {_summary(client, result_key)}")
                        del pending[key]
                        break
            await asyncio.sleep(0.5)
        if pending:
            print(f"\ntimed out waiting for: {', '.join(pending)}")
            return 1
        listing = client.list_objects_v2(Bucket=BUCKET, Prefix=settings.output_prefix)
        print(f"\nAll samples processed; s3://{BUCKET}/{settings.output_prefix} now holds:")
        for item in listing.get("Contents", []):
            print(f"  {item['Size']:>8}  {item['Key']}")
        if keep_running:
            print("\nDaemon and S3 keep running; drop files under input/ and press Ctrl+C to stop.")
            daemon.install_signal_handlers()
            await daemon._stop.wait()
    return 0


def _exists(client: object, key: str) -> bool:
    try:
        client.head_object(Bucket=BUCKET, Key=key)  # type: ignore[attr-defined]
    except Exception:
        return False
    return True


def run_demo(keep_running: bool = False, http_port: int = 8081) -> int:
    with SeaweedS3(buckets=(BUCKET,)) as server:
        return asyncio.run(_demo(server, keep_running, http_port))

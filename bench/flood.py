"""/health latency under a flood: N documents waiting, the CPU engine busy.

Uploads N small PNGs to an embedded SeaweedFS, starts the real daemon as its own process
(`python -m watcher run`, CPU engine in its worker process, default settings), waits until
discovery has seen the backlog, then probes /health every 20 ms for a while and prints
p50 / p99 / max latency with the backlog size /health reported.

    python bench/flood.py --docs 10000 --seconds 30
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from watcher.cli.embedded import SeaweedS3, free_ports


def small_png(text: str) -> bytes:
    image = Image.new("RGB", (320, 80), "white")
    ImageDraw.Draw(image).text((10, 30), text, fill="black")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def get_health(port: int) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
        body = json.loads(resp.read())
    return time.perf_counter() - started, body


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    body = small_png("Flood document")
    with tempfile.TemporaryDirectory(prefix="watcher-flood-") as tmp, \
            SeaweedS3(data_dir=Path(tmp) / "weed", buckets=("flood",)) as weed:
        s3 = weed.sync_client()
        started = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda i: s3.put_object(Bucket="flood", Key=f"input/flood/d{i:05d}.png",
                                                  Body=body), range(args.docs)))
        upload_seconds = time.perf_counter() - started
        (port,) = free_ports(1)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDRU_", "WATCHER_"))}
        env.update(CLOUDRU_S3_ENDPOINT=weed.endpoint, CLOUDRU_S3_BUCKET="flood",
                   CLOUDRU_S3_ACCESS_KEY=weed.access_key, CLOUDRU_S3_SECRET_KEY=weed.secret_key,
                   WATCHER_HTTP_PORT=str(port), WATCHER_HTTP_HOST="127.0.0.1",
                   WATCHER_LOG_LEVEL="WARNING")
        daemon = subprocess.Popen([sys.executable, "-m", "watcher", "run"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    _, health = get_health(port)
                    if health["engine"]["state"] == "ready" and health["backlog_documents"] > 0:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the daemon never reported its backlog")
                time.sleep(0.2)
            latencies, backlogs = [], []
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                seconds, health = get_health(port)
                latencies.append(seconds * 1000)
                backlogs.append(health["backlog_documents"])
                time.sleep(0.02)
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
    latencies.sort()
    print(json.dumps({
        "documents_uploaded": args.docs,
        "upload_seconds": round(upload_seconds, 1),
        "backlog_documents_min_max": [min(backlogs), max(backlogs)],
        "probes": len(latencies),
        "health_ms_p50": round(statistics.median(latencies), 2),
        "health_ms_p99": round(latencies[int(len(latencies) * 0.99) - 1], 2),
        "health_ms_max": round(latencies[-1], 2),
        "probes_over_50_ms": sum(1 for x in latencies if x > 50),
    }, indent=1))


if __name__ == "__main__":
    main()

"""How well the watcher keeps a VLM server busy: a backlog through the real daemon.

Uploads a backlog of multi-page PDFs to an embedded SeaweedFS, runs the real daemon with
WATCHER_ENGINE=openai-vlm against bench/gpu_sim.py (S slots, fixed service time), and
prints a JSON summary: engine utilisation = busy slot-seconds / (S x wall time from the
first request to the last response), pages per second, and the settings used.

    python bench/vlm_utilisation.py --docs 50 --pages 4 --slots 8 --service-time 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from docgen import make_pdf
from gpu_sim import GpuSimulator

from watcher.daemon import Daemon, running
from watcher.embedded import SeaweedS3
from watcher.logs import configure_logging
from watcher.settings import load_settings


def count_results(s3: Any, bucket: str) -> int:
    done = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="output/"):
        done += sum(1 for o in page.get("Contents", []) if o["Key"].endswith(".pdf.json"))
    return done


async def main(args: argparse.Namespace) -> dict[str, Any]:
    configure_logging("WARNING", "json")
    sim = await GpuSimulator(slots=args.slots, service_time=args.service_time).start()
    with tempfile.TemporaryDirectory(prefix="watcher-bench-") as tmp:
        weed = SeaweedS3(data_dir=Path(tmp) / "weed", buckets=("bench",))
        weed.start()
        try:
            s3 = weed.sync_client()
            for n in range(args.docs):
                pages = [[f"Document {n} page {p}", "Backlog benchmark"] for p in range(args.pages)]
                s3.put_object(Bucket="bench", Key=f"input/doc{n:03d}.pdf", Body=make_pdf(pages))
            settings = load_settings(
                s3_endpoint=weed.endpoint, s3_bucket="bench", s3_access_key=weed.access_key,
                s3_secret_key=weed.secret_key, http_port=0, http_host="127.0.0.1",
                poll_interval=1.0, engine="openai-vlm", vlm_url=sim.url,
                vlm_max_concurrency=args.vlm_concurrency,
                max_inflight_documents=args.inflight_documents,
                page_concurrency=args.page_concurrency, render_dpi=args.dpi,
                log_level="WARNING",
            )
            started = time.perf_counter()
            async with running(Daemon(settings)):
                while await asyncio.to_thread(count_results, s3, "bench") < args.docs:
                    await asyncio.sleep(0.5)
            elapsed = time.perf_counter() - started
        finally:
            weed.cleanup()
    await sim.stop()
    wall = (sim.last_response or 0) - (sim.first_request or 0)
    return {
        "utilisation": round(sim.utilisation(), 4),
        "pages": sim.requests,
        "pages_per_second": round(sim.requests / wall, 2) if wall else 0,
        "ideal_pages_per_second": round(args.slots / args.service_time, 2),
        "busy_slot_seconds": round(sim.busy_slot_seconds, 2),
        "wall_seconds_first_request_to_last_response": round(wall, 2),
        "total_seconds_including_warmup": round(elapsed, 2),
        "max_requests_in_flight_at_server": sim.max_inflight,
        "max_requests_queued_at_server": sim.max_queued,
        "settings": {
            "simulator_slots": args.slots,
            "service_time_seconds": args.service_time,
            "documents": args.docs,
            "pages_per_document": args.pages,
            "WATCHER_VLM_MAX_CONCURRENCY": args.vlm_concurrency,
            "WATCHER_MAX_INFLIGHT_DOCUMENTS": args.inflight_documents,
            "WATCHER_PAGE_CONCURRENCY": args.page_concurrency,
            "WATCHER_RENDER_DPI": args.dpi,
        },
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--docs", type=int, default=50)
    parser.add_argument("--pages", type=int, default=4)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--service-time", type=float, default=0.5)
    parser.add_argument("--vlm-concurrency", type=int, default=16)
    parser.add_argument("--inflight-documents", type=int, default=8)
    parser.add_argument("--page-concurrency", type=int, default=4)
    parser.add_argument("--dpi", type=int, default=100)
    return parser.parse_args()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse_args())), indent=1))

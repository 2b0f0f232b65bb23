"""How well the watcher keeps a VLM server busy, at default settings, for several GPU sizes.

For each simulated GPU size (`--slots`, sequence slots), uploads a backlog of multi-page
PDFs to an embedded SeaweedFS, runs the real daemon with WATCHER_ENGINE=openai-vlm (one
request per page) or `--engine paddleocr-vl` (PaddleOCR-VL's pipeline in the engine's
worker processes: the labelled fake in tests/fakes/fake_paddleocr.py, which sends every
block of the pages of a call to the server at once, `--blocks` per page, after
`--layout-seconds` of "layout detection" per page) against bench/gpu_sim.py in batching
mode (service time = --service-time + --per-running x requests running; vLLM's gauges
on /metrics unless --no-metrics), and reports per size:

* utilisation_while_backlogged: busy slot-seconds / (S x time from the first page's
  arrival to the last page's arrival): the part the daemon is responsible for;
* utilisation_after_ramp: the same from the moment every slot was first busy (the
  client's steady state), with `ramp_seconds` from the first request to that moment:
  a limit that grows from its start value needs a few service rounds (paddleocr-vl: a
  few calls, since a worker's batch changes only between calls);
* utilisation_whole_run: the same up to the last answer, tail included;
* requests per second against the ideal S / (service time + per_running x S);
* pages that took longer than WATCHER_VLM_TIMEOUT at the server (the daemon gave up).

The daemon runs at its defaults: WATCHER_VLM_MAX_CONCURRENCY, WATCHER_MAX_INFLIGHT_DOCUMENTS
and WATCHER_PAGE_CONCURRENCY are only set when given on the command line.

    python bench/vlm_utilisation.py                       # sizes 4, 64, 256
    python bench/vlm_utilisation.py --slots 4 --docs 8    # a quick check
    python bench/vlm_utilisation.py --engine paddleocr-vl --slots 64,256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
# The labelled fake `paddleocr` package, for --engine paddleocr-vl (spawned engine
# workers inherit this path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fakes"))

from docgen import make_pdf
from gpu_sim import GpuSimulator

from watcher.cli.embedded import SeaweedS3
from watcher.core.logs import configure_logging
from watcher.core.settings import load_settings
from watcher.service.daemon import Daemon, running

# Bench option -> Settings field, passed to the daemon only when given explicitly.
TUNING = {
    "vlm_concurrency": "vlm_max_concurrency",
    "inflight_documents": "max_inflight_documents",
    "page_concurrency": "page_concurrency",
    "engine_concurrency": "engine_concurrency",
}


def count_results(s3: Any, bucket: str) -> int:
    done = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="output/"):
        done += sum(1 for o in page.get("Contents", []) if o["Key"].endswith(".pdf.json"))
    return done


def requests_per_page(args: argparse.Namespace) -> int:
    return int(args.blocks) if args.engine == "paddleocr-vl" else 1


def documents_for(slots: int, args: argparse.Namespace) -> int:
    if args.docs is not None:
        return int(args.docs)
    # Several service rounds of the whole GPU, so the start-up ramp and the tail do not
    # decide the figure.
    pages: int = args.pages * requests_per_page(args)
    return max(40, math.ceil(slots * args.rounds / pages))


async def run_size(weed: SeaweedS3, slots: int, args: argparse.Namespace) -> dict[str, Any]:
    docs = documents_for(slots, args)
    bucket = f"bench-{slots}"
    s3 = weed.sync_client()
    s3.create_bucket(Bucket=bucket)
    for n in range(docs):
        pages = [[f"Document {n} page {p}", "Backlog benchmark"] for p in range(args.pages)]
        s3.put_object(Bucket=bucket, Key=f"input/doc{n:04d}.pdf", Body=make_pdf(pages))
    tuning = {field: getattr(args, option) for option, field in TUNING.items()
              if getattr(args, option) is not None}
    sim = await GpuSimulator(
        slots=slots, service_time=args.service_time, per_running=args.per_running,
        metrics=args.metrics,
    ).start()
    try:
        settings = load_settings(
            s3_endpoint=weed.endpoint, s3_bucket=bucket, s3_access_key=weed.access_key,
            s3_secret_key=weed.secret_key, http_port=0, http_host="127.0.0.1",
            poll_interval=1.0, engine=args.engine, vlm_url=sim.url, render_dpi=args.dpi,
            log_level="WARNING", **tuning,
        )
        # The daemon gives up on a page after WATCHER_VLM_TIMEOUT: slower is a timeout.
        sim.client_timeout = settings.vlm_timeout
        started = time.perf_counter()
        async with running(Daemon(settings)):
            while await asyncio.to_thread(count_results, s3, bucket) < docs:
                await asyncio.sleep(0.5)
        total = time.perf_counter() - started
    finally:
        await sim.stop()
    wall = (sim.last_response or 0.0) - (sim.first_request or 0.0)
    return {
        "slots": slots,
        "utilisation_while_backlogged": round(sim.utilisation_while_backlogged(), 4),
        "utilisation_after_ramp": round(sim.utilisation_after_ramp(), 4),
        "ramp_seconds": None if (ramp := sim.ramp_seconds()) is None else round(ramp, 1),
        "utilisation_whole_run": round(sim.utilisation(), 4),
        "engine": args.engine,
        "requests_per_second": round(sim.requests / wall, 2) if wall > 0 else 0.0,
        "ideal_requests_per_second": round(slots / (args.service_time + args.per_running * slots), 2),
        "timeouts": sim.timeouts,
        "max_inflight": sim.max_inflight,
        "max_queued": sim.max_queued,
        "documents": docs,
        "pages": sim.requests,
        "wall_seconds": round(wall, 2),
        "total_seconds_including_warmup": round(total, 2),
        "settings": {
            "service_time_seconds": args.service_time,
            "per_running_seconds": args.per_running,
            "server_metrics": args.metrics,
            "pages_per_document": args.pages,
            "requests_per_page": requests_per_page(args),
            "layout_seconds_per_page": args.layout_seconds if args.engine == "paddleocr-vl" else None,
            "WATCHER_ENGINE_CONCURRENCY": settings.engine_concurrency,
            "WATCHER_VLM_TIMEOUT": settings.vlm_timeout,
            "WATCHER_VLM_MAX_CONCURRENCY": settings.vlm_max_concurrency,
            "WATCHER_MAX_INFLIGHT_DOCUMENTS": settings.max_inflight_documents,
            "WATCHER_PAGE_CONCURRENCY": settings.page_concurrency,
            "WATCHER_RENDER_DPI": settings.render_dpi,
            "explicit": sorted(tuning),
        },
    }


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    configure_logging("WARNING", "json")
    if args.engine == "paddleocr-vl":
        # Read by the fake pipeline in the engine's worker processes.
        os.environ.update({"FAKE_PADDLEOCR_SEND_BLOCKS": "1",
                           "FAKE_PADDLEOCR_BLOCKS": str(args.blocks),
                           "FAKE_PADDLEOCR_LAYOUT_SECONDS": str(args.layout_seconds)})
    results = []
    with tempfile.TemporaryDirectory(prefix="watcher-bench-") as tmp:
        weed = SeaweedS3(data_dir=Path(tmp) / "weed", buckets=())
        weed.start()
        try:
            for slots in args.slots:
                results.append(await run_size(weed, slots, args))
        finally:
            weed.cleanup()
    return results


def markdown_table(results: list[dict[str, Any]]) -> str:
    columns = [
        ("engine", "engine"), ("slots", "slots"),
        ("utilisation_while_backlogged", "util. backlogged"),
        ("utilisation_after_ramp", "util. after ramp"), ("ramp_seconds", "ramp s"),
        ("utilisation_whole_run", "util. whole run"), ("requests_per_second", "requests/s"),
        ("ideal_requests_per_second", "ideal requests/s"), ("timeouts", "timeouts"),
        ("max_inflight", "max running"), ("max_queued", "max queued"),
        ("documents", "docs"), ("wall_seconds", "wall s"),
    ]
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + " ---: |" * len(columns)]
    lines += ["| " + " | ".join(str(r[key]) for key, _ in columns) + " |" for r in results]
    return "\n".join(lines)


def slot_list(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"slot counts must be positive integers: {text!r}")
    return sizes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--engine", choices=["openai-vlm", "paddleocr-vl"], default="openai-vlm")
    parser.add_argument("--blocks", type=int, default=8,
                        help="paddleocr-vl: blocks per page the fake pipeline sends (default 8)")
    parser.add_argument("--layout-seconds", type=float, default=0.03,
                        help="paddleocr-vl: the fake's layout detection per page (default 0.03)")
    parser.add_argument("--engine-concurrency", type=int, default=None,
                        help="WATCHER_ENGINE_CONCURRENCY (default: the daemon's)")
    parser.add_argument("--slots", type=slot_list, default=[4, 64, 256],
                        help="simulated GPU sizes, comma-separated (default 4,64,256)")
    parser.add_argument("--docs", type=int, default=None,
                        help="documents per size (default max(40, ceil(slots x rounds / requests "
                        "per document)))")
    parser.add_argument("--pages", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6,
                        help="backlog in full service rounds of the GPU (default 6)")
    parser.add_argument("--service-time", type=float, default=1.0)
    parser.add_argument("--per-running", type=float, default=0.04)
    parser.add_argument("--no-metrics", dest="metrics", action="store_false",
                        help="the simulator has no /metrics (404), as a server without vLLM's gauges")
    parser.add_argument("--vlm-concurrency", type=int, default=None,
                        help="WATCHER_VLM_MAX_CONCURRENCY (default: the daemon's)")
    parser.add_argument("--inflight-documents", type=int, default=None,
                        help="WATCHER_MAX_INFLIGHT_DOCUMENTS (default: the daemon's)")
    parser.add_argument("--page-concurrency", type=int, default=None,
                        help="WATCHER_PAGE_CONCURRENCY (default: the daemon's)")
    parser.add_argument("--dpi", type=int, default=72)
    return parser.parse_args()


if __name__ == "__main__":
    results = asyncio.run(main(parse_args()))
    print(json.dumps(results, indent=1))
    print()
    print(markdown_table(results))

"""Pages per second through the daemon (engine in its worker process) vs. the CPU engine
called directly in this process.

    python bench/cpu_throughput.py [--docs 12] [--pages 3] [--dpi 150]

Both figures come from one run on the same pages, so the ratio is what matters on a
noisy machine: the daemon's overhead (S3 fetch, decode, render, publish, bookkeeping)
should cost little, because decoding and S3 I/O overlap with recognition.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from docgen import make_pdf

from watcher.cli.embedded import SeaweedS3
from watcher.core.logs import configure_logging
from watcher.core.pages import RenderedPage
from watcher.core.settings import load_settings
from watcher.engines.cpu import CpuEngine
from watcher.pipeline.decode import Limits, open_document
from watcher.service.daemon import Daemon, running

LINES = [
    "The watcher benchmark page {doc}-{page}",
    "Quarterly revenue rose by twelve percent",
    "Operating costs were held flat year on year",
    "Customers in three new regions were served",
    "Total due 48213.50 within thirty days",
]


def documents(count: int, pages: int) -> list[bytes]:
    return [
        make_pdf([[line.format(doc=d, page=p) for line in LINES] for p in range(pages)])
        for d in range(count)
    ]


def render_all(pdfs: list[bytes], dpi: int) -> list[RenderedPage]:
    limits = Limits(max_pages=1000, max_page_pixels=60_000_000, render_dpi=dpi)
    rendered = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, data in enumerate(pdfs):
            path = Path(tmp) / f"{i}.pdf"
            path.write_bytes(data)
            doc = open_document(path, len(data), limits)
            rendered += [doc.render(n) for n in range(doc.page_count)]
            doc.close()
    return rendered


async def direct(engine: CpuEngine, pages: list[RenderedPage]) -> float:
    started = time.perf_counter()
    for page in pages:
        await engine.recognise(page)
    return time.perf_counter() - started


async def through_daemon(pdfs: list[bytes], dpi: int) -> float:
    """The production path: the daemon's own engine, in its supervised worker process."""
    with SeaweedS3(buckets=("bench",)) as server:
        client = server.sync_client()
        settings = load_settings(
            s3_endpoint=server.endpoint, s3_bucket="bench", s3_access_key=server.access_key,
            s3_secret_key=server.secret_key, poll_interval=0.2, http_port=0,
            http_host="127.0.0.1", render_dpi=dpi, log_level="WARNING",
            # Every page through the engine, as the direct run does: the generated PDFs
            # are born-digital, and their text layer would otherwise be read instead.
            text_layer="ocr",
        )
        daemon = Daemon(settings)
        async with running(daemon):
            await daemon.wait_polls(1, timeout=60)
            while daemon.engine.state.value != "ready":
                await asyncio.sleep(0.05)
            for i, data in enumerate(pdfs):
                client.put_object(Bucket="bench", Key=f"input/doc-{i:03d}.pdf", Body=data)
            started = time.perf_counter()
            daemon.poke()
            total = len(pdfs)
            while daemon.metrics.documents.labels("done")._value.get() < total:
                await asyncio.sleep(0.02)
            return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=12)
    parser.add_argument("--pages", type=int, default=3)
    parser.add_argument("--dpi", type=int, default=150)
    args = parser.parse_args()
    configure_logging("WARNING", "console")
    pdfs = documents(args.docs, args.pages)
    pages = render_all(pdfs, args.dpi)
    engine = CpuEngine(concurrency=1)
    await engine.start()
    # Direct runs before and after the daemon's, so that warm-up drift or a noisy
    # neighbour does not favour either side; their mean is the reference.
    direct_before = await direct(engine, pages)
    daemon_seconds = await through_daemon(pdfs, args.dpi)
    direct_after = await direct(engine, pages)
    direct_seconds = (direct_before + direct_after) / 2
    await engine.close()
    n = len(pages)
    summary = {
        "pages": n,
        "dpi": args.dpi,
        "direct_pages_per_second_before_after": [round(n / direct_before, 3),
                                                 round(n / direct_after, 3)],
        "direct_pages_per_second": round(n / direct_seconds, 3),
        "daemon_pages_per_second": round(n / daemon_seconds, 3),
        "ratio_daemon_over_direct": round(direct_seconds / daemon_seconds, 3),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())

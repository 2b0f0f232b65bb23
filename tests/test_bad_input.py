"""Bad documents get a clear error record; good ones beside them are still processed."""

from __future__ import annotations

import asyncio
import io
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from conftest import CountingEngine, daemon_running, files_under, make_settings, wait_for_keys
from docgen import make_image, make_pdf
from PIL import Image
from waiting import eventually

from watcher.cli.embedded import SeaweedS3
from watcher.core.pages import PageResult, RenderedPage

ERROR_SCHEMA = json.loads((files("watcher") / "schema" / "error-v1.json").read_text())


def pixel_bomb() -> bytes:
    """A 20000x20000 PNG: a few hundred kB on disk, 400 megapixels once decoded."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000), 1).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def truncated_png() -> bytes:
    data = make_image(["This image is cut short"], "PNG")
    return data[: len(data) // 2]


def broken_pdf() -> bytes:
    return b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\ntrailer\n%%EOF garbage"


BAD: dict[str, tuple[bytes, str, str]] = {
    # rel key -> (bytes, expected error.code, a word the message must contain)
    "bad/empty.pdf": (b"", "empty", "empty"),
    "bad/broken.pdf": (broken_pdf(), "corrupt", "PDF"),
    "bad/locked.pdf": (make_pdf([["Secret page"]], password="hunter2"), "encrypted", "password"),
    "bad/notes.txt": (b"just some text, not a document\n", "unsupported_format", "PDF, PNG"),
    "bad/report.docx": (b"PK\x03\x04" + b"\x00" * 200, "unsupported_format", ".docx"),
    "bad/cut.png": (truncated_png(), "corrupt", "image"),
    "bad/bomb.png": (pixel_bomb(), "page_too_large", "WATCHER_MAX_PAGE_PIXELS"),
    "bad/long.pdf": (make_pdf([[f"Page {i}"] for i in range(6)]), "too_many_pages",
                     "WATCHER_MAX_PAGES"),
    "bad/huge.bmp": (make_image(["big"], "BMP", size=(1200, 900)), "too_large",
                     "WATCHER_MAX_OBJECT_BYTES"),
}


async def test_every_bad_input_gets_an_error_record_and_good_ones_go_on(
    weed: SeaweedS3, bucket: str, s3: Any, tmp_path: Path
) -> None:
    good = {"good/first.png": ["Good document ECHO"], "good/second.png": ["Another good FOXTROT"]}
    # Bad documents first, so the good ones come after them in the queue.
    for rel, (body, _, _) in BAD.items():
        s3.put_object(Bucket=bucket, Key=f"input/{rel}", Body=body)
    for rel, lines in good.items():
        s3.put_object(Bucket=bucket, Key=f"input/{rel}", Body=make_image(lines, "PNG"))
    settings = make_settings(weed, bucket, max_pages=5, max_object_bytes=2_000_000,
                             temp_dir=str(tmp_path))
    engine = CountingEngine()
    statuses: list[int] = []

    async with daemon_running(settings, engine) as daemon:
        url = f"http://127.0.0.1:{daemon.http.port}/health"

        async def probe() -> None:
            async with aiohttp.ClientSession() as http:
                while True:
                    async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        statuses.append(resp.status)
                    await asyncio.sleep(0.1)

        prober = asyncio.create_task(probe())
        try:
            await wait_for_keys(
                s3, bucket,
                [f"output/{r}.error.json" for r in BAD] + [f"output/{r}.json" for r in good],
            )
        finally:
            prober.cancel()
        await daemon.wait_polls(daemon.polls + 2, timeout=30)

    assert statuses and set(statuses) == {200}
    assert files_under(tmp_path) == []  # every downloaded source was removed
    for rel, (body, code, word) in BAD.items():
        record = json.loads(s3.get_object(Bucket=bucket, Key=f"output/{rel}.error.json")["Body"].read())
        jsonschema.validate(record, ERROR_SCHEMA)
        assert record["error"]["code"] == code, (rel, record)
        assert word.lower() in record["error"]["message"].lower(), (rel, record)
        assert record["source"]["key"] == f"input/{rel}" and record["source"]["size"] == len(body)
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"output/{rel}")["Contents"]}
        assert keys == {f"output/{rel}.error.json"}  # an error record, no half result
    # The bad documents never reached the engine; each good page did, exactly once.
    assert len(engine.calls) == len(good)
    # Error records are done-ness too: nothing is retried on later polls.
    assert daemon.metrics.documents.labels("error")._value.get() == len(BAD)


class CrashingEngine(CountingEngine):
    """Failure injection around the real CPU engine: pages whose text says CRASH raise."""

    async def recognise(self, page: RenderedPage) -> PageResult:
        result = await super().recognise(page)
        if any("CRASH" in b.text.upper() for b in result.blocks):
            raise RuntimeError("simulated engine crash")
        return result


async def test_a_document_that_keeps_crashing_the_engine_is_given_up(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    s3.put_object(Bucket=bucket, Key="input/poison.png", Body=make_image(["CRASH ME"], "PNG"))
    s3.put_object(Bucket=bucket, Key="input/fine.png", Body=make_image(["Perfectly fine"], "PNG"))
    settings = make_settings(weed, bucket, max_attempts=3, poll_interval=0.3)
    engine = CrashingEngine()
    async with daemon_running(settings, engine):
        await wait_for_keys(s3, bucket, ["output/poison.png.error.json", "output/fine.png.json"])
    record = json.loads(s3.get_object(Bucket=bucket, Key="output/poison.png.error.json")["Body"].read())
    assert record["error"]["code"] == "engine_failed"
    assert record["error"]["attempts"] == 3
    assert "simulated engine crash" in record["error"]["message"]
    # Two poison attempts and one good page: on the third attempt the poison's one page
    # is blamed for the crashes and not read again.
    assert engine.calls.count(0) == 2 + 1


@pytest.mark.parametrize("rel", ["bad/broken.pdf"])
async def test_a_fixed_document_replaces_its_error_record(
    weed: SeaweedS3, bucket: str, s3: Any, rel: str
) -> None:
    key = f"input/{rel}"
    s3.put_object(Bucket=bucket, Key=key, Body=broken_pdf())
    settings = make_settings(weed, bucket)
    async with daemon_running(settings):
        await wait_for_keys(s3, bucket, [f"output/{rel}.error.json"])
        s3.put_object(Bucket=bucket, Key=key, Body=make_pdf([["Repaired document GOLF"]]))
        await wait_for_keys(s3, bucket, [f"output/{rel}.json"])

        def error_record_gone() -> bool:
            listing = s3.list_objects_v2(Bucket=bucket, Prefix="output/")["Contents"]
            return f"output/{rel}.error.json" not in {o["Key"] for o in listing}

        await eventually(error_record_gone, 10, f"output/{rel}.error.json to be removed", every=0.2)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="output/")["Contents"]}
    assert keys == {f"output/{rel}.json", f"output/{rel}.md"}


class FlakyWarmEngine(CountingEngine):
    """Failure injection: the first warm-up fails, as when a VLM server is not up yet."""

    def __init__(self) -> None:
        super().__init__()
        self.warm_calls = 0

    async def warm(self) -> None:
        self.warm_calls += 1
        if self.warm_calls == 1:
            raise RuntimeError("backend not up yet")
        await super().warm()


async def test_a_failed_warm_up_is_retried_and_work_waits_for_it(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    s3.put_object(Bucket=bucket, Key="input/waits.png", Body=make_image(["Waited for engine"], "PNG"))
    settings = make_settings(weed, bucket, engine_retry_seconds=1.0)
    engine = FlakyWarmEngine()
    async with daemon_running(settings, engine) as daemon:
        url = f"http://127.0.0.1:{daemon.http.port}"
        async with aiohttp.ClientSession() as http:

            async def health_if_failed() -> dict[str, Any] | None:
                async with http.get(f"{url}/health") as resp:
                    health: dict[str, Any] = await resp.json()
                return health if health["engine"]["state"] == "failed" else None

            health = await eventually(health_if_failed, 5, "/health to report the engine failed",
                                      every=0.05)
            assert health["paddleocr"] == "failed" and "not up yet" in health["engine"]["error"]
            async with http.get(f"{url}/ready") as resp:
                assert resp.status == 503
                assert "failed" in (await resp.json())["reasons"][0]
        await wait_for_keys(s3, bucket, ["output/waits.png.json"])
    assert engine.warm_calls == 2
    assert not any(o["Key"].endswith(".error.json")
                   for o in s3.list_objects_v2(Bucket=bucket, Prefix="output/")["Contents"])

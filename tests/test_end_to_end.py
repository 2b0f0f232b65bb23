"""End to end: real SeaweedFS over HTTP, the real CPU engine, generated documents."""

from __future__ import annotations

import asyncio
import hashlib
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
from conftest import CountingEngine, daemon_running, files_under, leftovers, make_settings, wait_for_keys
from docgen import make_image, make_pdf, make_tiff
from rapidfuzz import fuzz
from waiting import eventually

from watcher.bucket.done import Done, DoneMarkers
from watcher.bucket.names import Names
from watcher.bucket.storage import open_storage
from watcher.cli.embedded import SeaweedS3
from watcher.intake.discovery import Discovery
from watcher.service.daemon import Daemon

SCHEMA = json.loads((files("watcher") / "schema" / "result-v2.json").read_text())

PDF_PAGES = [
    ["QUARTERLY REPORT ALPHA", "Revenue grew strongly"],
    ["Second page BRAVO", "Costs were stable"],
    ["Third page CHARLIE", "Outlook remains positive"],
]

# key (relative to input/) -> (bytes, expected phrases, page count)
DOCUMENTS: dict[str, tuple[bytes, list[str], int]] = {
    "reports/q3 report.pdf": (make_pdf(PDF_PAGES), [line for p in PDF_PAGES for line in p], 3),
    "scans/plus+sign.png": (make_image(["Invoice number 4711", "ACME GmbH"], "PNG"),
                            ["Invoice number 4711", "ACME GmbH"], 1),
    "scans/percent%20name.jpg": (make_image(["Delivery note 99", "Blue widgets"], "JPEG"),
                                 ["Delivery note 99", "Blue widgets"], 1),
    "Документы/договор №1.tiff": (make_tiff([["Contract page one"], ["Contract page two"]]),
                                  ["Contract page one", "Contract page two"], 2),
    "misc/old scan.bmp": (make_image(["Bitmap scanner output"], "BMP"),
                          ["Bitmap scanner output"], 1),
    "misc/phone.webp": (make_image(["Photo taken with phone"], "WEBP"),
                        ["Photo taken with phone"], 1),
    # Named like an image, but it is a PDF: content decides, not the extension.
    "misc/misnamed.png": (make_pdf([["Actually a PDF file"]]), ["Actually a PDF file"], 1),
}


def contains_fuzzy(text: str, phrase: str) -> bool:
    return fuzz.partial_ratio(phrase.lower(), text.lower()) >= 85


def load_json(s3: Any, bucket: str, key: str) -> Any:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def result_for(s3: Any, bucket: str, key: str, etag: str) -> Any:
    """The result JSON at `key` once it is the one of source ETag `etag`, else None."""
    result = load_json(s3, bucket, key)
    return result if result["source"]["etag"] == etag else None


async def test_documents_become_results_and_a_second_run_does_nothing(
    weed: SeaweedS3, bucket: str, s3: Any, tmp_path: Path
) -> None:
    for rel, (body, _, _) in DOCUMENTS.items():
        s3.put_object(Bucket=bucket, Key=f"input/{rel}", Body=body)
    s3.put_object(Bucket=bucket, Key="input/reports/", Body=b"")  # a folder marker
    settings = make_settings(weed, bucket, temp_dir=str(tmp_path))
    results = [f"output/{rel}.json" for rel in DOCUMENTS]

    engine = CountingEngine()
    async with daemon_running(settings, engine) as daemon:
        url = f"http://127.0.0.1:{daemon.http.port}"
        await wait_for_keys(s3, bucket, results)
        done = f'watcher_documents_total{{outcome="done"}} {float(len(DOCUMENTS))}'
        async with aiohttp.ClientSession() as http:

            async def counted() -> str | None:
                # A result is out a moment before its run ends (marker, lease, hooks):
                # the runs have all ended once the outcome hook has counted them.
                async with http.get(f"{url}/metrics") as resp:
                    text = await resp.text()
                return text if done in text else None

            metrics = await eventually(counted, 30, "every run to be counted as done")
            async with http.get(f"{url}/health") as resp:
                assert resp.status == 200
                health = await resp.json()
            async with http.get(f"{url}/ready") as resp:
                assert resp.status == 200, await resp.text()
    assert health["status"] == "healthy" and health["paddleocr"] == "ready"
    total_pages = sum(pages for _, _, pages in DOCUMENTS.values())
    assert f"watcher_pages_total {float(total_pages)}" in metrics
    assert done in metrics
    for name in ("watcher_stage_seconds_bucket", "watcher_inflight_documents",
                 "watcher_backlog_documents", "watcher_engine_ready 1.0"):
        assert name in metrics
    assert files_under(tmp_path) == []  # temp files removed

    listing = s3.list_objects_v2(Bucket=bucket, Prefix="output/")["Contents"]
    keys = {item["Key"] for item in listing}
    assert not any(k.endswith(".error.json") for k in keys), keys
    assert "output/reports/.json" not in keys  # the folder marker is not a document
    for rel, (body, phrases, pages) in DOCUMENTS.items():
        result = load_json(s3, bucket, f"output/{rel}.json")
        jsonschema.validate(result, SCHEMA)
        head = s3.head_object(Bucket=bucket, Key=f"input/{rel}")
        assert result["source"] == {
            "bucket": bucket, "key": f"input/{rel}", "etag": head["ETag"].strip('"'),
            "size": len(body), "last_modified": result["source"]["last_modified"],
            "sha256": hashlib.sha256(body).hexdigest(),
        }
        assert len(result["pages"]) == pages
        for page in result["pages"]:
            for block in page["blocks"]:
                x0, y0, x1, y1 = block["bbox"]
                assert 0 <= x0 < x1 <= page["width"] + 1 and 0 <= y0 < y1 <= page["height"] + 1
        text = " ".join(b["text"] for p in result["pages"] for b in p["blocks"])
        markdown = s3.get_object(Bucket=bucket, Key=f"output/{rel}.md")["Body"].read().decode()
        assert markdown == result["markdown"]
        for phrase in phrases:
            assert contains_fuzzy(text, phrase), (rel, phrase, text)
            assert contains_fuzzy(markdown, phrase), (rel, phrase, markdown)
    # Only pages without a trustworthy text layer went through the engine.
    ocr_pages = sum(
        page["text_source"] == "ocr"
        for rel in DOCUMENTS for page in load_json(s3, bucket, f"output/{rel}.json")["pages"]
    )
    assert len(engine.calls) == ocr_pages
    # Reading order survives into Markdown: page 1 before page 3, line 1 before line 2.
    report = load_json(s3, bucket, "output/reports/q3 report.pdf.json")["markdown"].lower()
    assert report.index("alpha") < report.index("bravo") < report.index("charlie")
    assert report.index("revenue") < report.index("bravo")
    # Not ASCII-escaped: the Cyrillic key appears as UTF-8 in the stored JSON.
    raw = s3.get_object(Bucket=bucket, Key="output/Документы/договор №1.tiff.json")["Body"].read()
    assert "Документы".encode() in raw

    stamps = {i["Key"]: (i["ETag"], i["LastModified"]) for i in listing}
    # A restart in burst mode (--once): it returns once a poll finds nothing to do, so
    # "nothing was read again" is a fact about a finished run, not a wait.
    second = CountingEngine()
    again = Daemon(settings, engine=second, once=True)
    await asyncio.wait_for(again.run(), 60)
    assert second.calls == [] and again.unfinished() == [] and again.polls >= 1
    after = s3.list_objects_v2(Bucket=bucket, Prefix="output/")["Contents"]
    assert {i["Key"]: (i["ETag"], i["LastModified"]) for i in after} == stamps
    assert leftovers(s3, bucket) == []


async def test_replaced_source_is_processed_again(weed: SeaweedS3, bucket: str, s3: Any) -> None:
    key = "input/letter.png"
    s3.put_object(Bucket=bucket, Key=key, Body=make_image(["First version KILO"], "PNG"))
    settings = make_settings(weed, bucket)
    engine = CountingEngine()
    async with daemon_running(settings, engine) as daemon:
        await wait_for_keys(s3, bucket, ["output/letter.png.json"])
        first = load_json(s3, bucket, "output/letter.png.json")
        assert contains_fuzzy(first["markdown"], "First version KILO")
        s3.put_object(Bucket=bucket, Key=key, Body=make_image(["Second version LIMA"], "PNG"))
        new_etag = s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        result = await eventually(lambda: result_for(s3, bucket, "output/letter.png.json", new_etag), 30,
                                  f"the result of {new_etag}", every=0.3)
        await daemon.wait_polls(daemon.polls + 2, timeout=30)
    assert result["source"]["etag"] == new_etag
    assert contains_fuzzy(result["markdown"], "Second version LIMA")
    assert len(engine.calls) == 2


async def test_the_same_content_uploaded_again_is_not_read_again(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    key, body = "input/contract.pdf", make_pdf([["Same bytes again", "uploaded twice"]])
    s3.put_object(Bucket=bucket, Key=key, Body=body)
    engine = CountingEngine()
    settings = make_settings(weed, bucket, text_layer="ocr")
    async with daemon_running(settings, engine):
        await wait_for_keys(s3, bucket, ["output/contract.pdf.json"])
        first = load_json(s3, bucket, "output/contract.pdf.json")
        calls = len(engine.calls)
        # The AWS CLI uploads large files in parts: same bytes, an ETag ending in "-1".
        upload = s3.create_multipart_upload(Bucket=bucket, Key=key)
        part = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=body)
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={
            "Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
        new_etag = s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        assert new_etag.endswith("-1") and new_etag != first["source"]["etag"]
        await eventually(lambda: result_for(s3, bucket, "output/contract.pdf.json", new_etag), 120,
                         f"the result to name {new_etag}", every=0.3)
        repointed = load_json(s3, bucket, "output/contract.pdf.json")
        assert len(engine.calls) == calls  # not read again
        jsonschema.validate(repointed, SCHEMA)
        assert repointed["reused"]["from_etag"] == first["source"]["etag"]
        assert repointed["source"]["sha256"] == first["source"]["sha256"]
        assert repointed["pages"] == first["pages"] and repointed["markdown"] == first["markdown"]
        md_head = s3.head_object(Bucket=bucket, Key="output/contract.pdf.md")
        assert md_head["Metadata"]["source-etag"] == new_etag
        # A different content under the same key is read, as before.
        s3.put_object(Bucket=bucket, Key=key, Body=make_pdf([["Different bytes now"]]))
        changed = s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        await eventually(lambda: result_for(s3, bucket, "output/contract.pdf.json", changed), 120,
                         f"the result to name {changed}", every=0.3)
    last = load_json(s3, bucket, "output/contract.pdf.json")
    assert len(engine.calls) == calls + 1  # only the changed content was read
    assert "reused" not in last and contains_fuzzy(last["markdown"], "Different bytes now")
    head = s3.head_object(Bucket=bucket, Key="output/contract.pdf.json")
    assert head["Metadata"]["source-sha256"] == last["source"]["sha256"] != first["source"]["sha256"]


async def test_done_is_read_from_listings_after_a_restart(weed: SeaweedS3, bucket: str, s3: Any) -> None:
    for n in range(6):
        s3.put_object(Bucket=bucket, Key=f"input/d{n}.png", Body=make_image([f"Done marker {n}"], "PNG"))
    s3.put_object(Bucket=bucket, Key="input/bad.png", Body=b"\x89PNG\r\n\x1a\n broken")
    settings = make_settings(weed, bucket)
    async with daemon_running(settings):
        await wait_for_keys(s3, bucket, [*(f"output/d{n}.png.json" for n in range(6)),
                                         "output/bad.png.error.json"])
    names = Names.from_settings(settings)
    async with open_storage(settings) as storage:
        requests: list[str] = []
        storage.on_request = requests.append
        # A fresh replica finds nothing to do from listings of one page each (markers,
        # sources, leases): no request per document, and the output prefix is not listed.
        assert await Discovery(storage, settings, names).scan() == []
        assert requests == ["list", "list", "list"]
        # A bucket from before markers: its versions look pending to discovery; the claim
        # stage checks each result once (a HEAD for the result or error record, one for a marker a
        # racing replica may have written) and marks it.
        for item in s3.list_objects_v2(Bucket=bucket, Prefix=names.markers_prefix)["Contents"]:
            s3.delete_object(Bucket=bucket, Key=item["Key"])
        legacy = await Discovery(storage, settings, names).scan()
        assert sorted(r.key for r in legacy) == sorted([*(f"input/d{n}.png" for n in range(6)),
                                                        "input/bad.png"])
        done = DoneMarkers(storage, names)
        requests.clear()
        found = {ref.key: await done.published(ref) for ref in legacy}
        assert found.pop("input/bad.png") is Done.ERROR_RECORD
        assert set(found.values()) == {Done.RESULT}
        # Per version (its lease held): its result (and error record), then its marker written.
        assert requests.count("head") <= 3 * len(legacy) and requests.count("put") == len(legacy)
        assert "list" not in requests
        requests.clear()
        assert await Discovery(storage, settings, names).scan() == []
        assert requests == ["list", "list", "list"]

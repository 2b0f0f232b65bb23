"""The openai-vlm engine end to end: real SeaweedFS, the real daemon and engine, and a
protocol fake of the vLLM server (tests/vlm_fake.py) that OCRs the pages it is sent."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any

import aiohttp
import jsonschema
import pytest
import rudocs
from conftest import daemon_running, make_settings, object_exists, wait_for_keys
from docgen import make_image, make_pdf
from PIL import Image
from rapidfuzz import fuzz
from vlm_fake import FakeVlmServer
from waiting import eventually

from watcher.cli.embedded import SeaweedS3
from watcher.core.settings import DEFAULT_PIPELINE_VERSION, PADDLEOCR_VL_MODELS, Settings
from watcher.engines import create_engine
from watcher.engines.base import EngineState
from watcher.engines.doctags import parse_doctags, text_page
from watcher.engines.openai_vlm import REPETITION_PENALTY, OpenAIVlmEngine

SCHEMA = json.loads((files("watcher") / "schema" / "result-v2.json").read_text())
MODEL = PADDLEOCR_VL_MODELS[DEFAULT_PIPELINE_VERSION][0]


@pytest.fixture
async def fake() -> AsyncIterator[FakeVlmServer]:
    server = await FakeVlmServer(served_model=MODEL).start()
    yield server
    await server.stop()


def vlm_settings(weed: SeaweedS3, bucket: str, fake: FakeVlmServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "engine": "openai-vlm",
        "vlm_url": fake.url,
        "vlm_model": MODEL,
        "vlm_timeout": 30,
        "vlm_max_retries": 2,
        "vlm_startup_timeout": 20,
        "poll_interval": 0.3,
    }
    values.update(overrides)
    return make_settings(weed, bucket, **values)


def fast_engine(settings: Settings) -> OpenAIVlmEngine:
    # Same engine, shorter probe and backoff so that failure tests take seconds.
    return OpenAIVlmEngine(settings, probe_interval=0.2, backoff_initial=0.05, backoff_max=0.2)


def contains_fuzzy(text: str, phrase: str) -> bool:
    return fuzz.partial_ratio(phrase.lower(), text.lower()) >= 85


def load_json(s3: Any, bucket: str, key: str) -> Any:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def output_keys(s3: Any, bucket: str) -> set[str]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="output/").get("Contents", [])
    return {item["Key"] for item in listing}


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json()


async def test_results_carry_the_words_read_by_the_vlm(
    weed: SeaweedS3, bucket: str, s3: Any, fake: FakeVlmServer
) -> None:
    docs = {
        "scans/invoice.png": (make_image(["Invoice number 4711", "ACME GmbH"], "PNG"),
                              ["Invoice number 4711", "ACME GmbH"], 1),
        "reports/two.pdf": (make_pdf([["First page ALPHA"], ["Second page BRAVO"]]),
                            ["First page ALPHA", "Second page BRAVO"], 2),
    }
    for rel, (body, _, _) in docs.items():
        s3.put_object(Bucket=bucket, Key=f"input/{rel}", Body=body)
    settings = vlm_settings(weed, bucket, fake)
    engine = create_engine(settings)
    assert isinstance(engine, OpenAIVlmEngine)
    async with daemon_running(settings, engine) as daemon:
        await wait_for_keys(s3, bucket, [f"output/{rel}.json" for rel in docs], timeout=90)
        status, _ = await get(f"http://127.0.0.1:{daemon.http.port}/ready")
        assert status == 200
    assert not any(k.endswith(".error.json") for k in output_keys(s3, bucket))
    for rel, (_, phrases, pages) in docs.items():
        result = load_json(s3, bucket, f"output/{rel}.json")
        jsonschema.validate(result, SCHEMA)
        assert result["engine"] == {"name": "openai-vlm", "model": MODEL}
        assert len(result["pages"]) == pages
        for page in result["pages"]:
            assert page["raw"]["response"]
            for block in page["blocks"]:
                assert block["type"] == "text"
                assert block["bbox"] == [0, 0, page["width"], page["height"]]
        for phrase in phrases:
            assert contains_fuzzy(result["markdown"], phrase), (rel, phrase, result["markdown"])
    # One warm-up request plus one per page, all with the preset's prompt.
    assert fake.requests == 1 + sum(p for _, _, p in docs.values())
    assert set(fake.prompts) == {"OCR:"}
    assert set(fake.auth_headers) == {None}


async def test_a_vlm_reads_born_digital_pages_and_the_text_layer_covers_what_it_cannot_see(
    weed: SeaweedS3, bucket: str, s3: Any, fake: FakeVlmServer
) -> None:
    # The VLM reads trusted text layers too (layout is what it is for); a page that renders
    # blank (its font is not embedded) takes its text layer instead, with a warning.
    s3.put_object(Bucket=bucket, Key="input/text.pdf", Body=rudocs.ru_pdf([rudocs.RUSSIAN_TEXT[0][:3]]))
    s3.put_object(Bucket=bucket, Key="input/blank.pdf", Body=rudocs.pdf_nonembedded_font())
    settings = vlm_settings(weed, bucket, fake, render_dpi=150)
    async with daemon_running(settings, create_engine(settings)):
        await wait_for_keys(s3, bucket, ["output/text.pdf.json", "output/blank.pdf.json"], timeout=90)
    text = load_json(s3, bucket, "output/text.pdf.json")
    assert text["pages"][0]["text_source"] == "ocr" and text["pages"][0]["raw"]["response"]
    blank = load_json(s3, bucket, "output/blank.pdf.json")
    jsonschema.validate(blank, SCHEMA)
    assert blank["pages"][0]["text_source"] == "text_layer"
    assert blank["pages"][0]["markdown"].split() == " ".join(rudocs.CYRILLIC_ONLY).split()
    assert [w["code"] for w in blank["warnings"]] == ["engine_read_nothing"]
    assert fake.requests == 1 + 2  # warm-up, then both pages went to the VLM


async def test_wrong_model_name_is_a_clear_failure_and_documents_wait(
    weed: SeaweedS3, bucket: str, s3: Any, fake: FakeVlmServer
) -> None:
    fake.served_model = "some-other-model"
    s3.put_object(Bucket=bucket, Key="input/a.png", Body=make_image(["Waiting document KILO"], "PNG"))
    settings = vlm_settings(weed, bucket, fake)
    engine = fast_engine(settings)
    async with daemon_running(settings, engine) as daemon:
        base = f"http://127.0.0.1:{daemon.http.port}"
        await eventually(lambda: engine.state is EngineState.FAILED, what="engine failed")
        status, ready = await get(f"{base}/ready")
        assert status == 503
        reason = " ".join(ready["reasons"])
        assert MODEL in reason and "--served-model-name" in reason, reason
        status, health = await get(f"{base}/health")
        assert status == 200 and health["engine"]["state"] == "failed"
        await daemon.wait_polls(daemon.polls + 2, timeout=10)
        assert output_keys(s3, bucket) == set()
        # The operator fixes the served name: the engine recovers without a restart.
        fake.served_model = MODEL
        await wait_for_keys(s3, bucket, ["output/a.png.json"], timeout=60)
        status, _ = await get(f"{base}/ready")
        assert status == 200
    assert contains_fuzzy(load_json(s3, bucket, "output/a.png.json")["markdown"], "Waiting document KILO")
    assert output_keys(s3, bucket) == {"output/a.png.json", "output/a.png.md"}


async def test_model_renamed_while_running_fails_the_engine_not_the_document(
    weed: SeaweedS3, bucket: str, s3: Any, fake: FakeVlmServer
) -> None:
    settings = vlm_settings(weed, bucket, fake)
    engine = fast_engine(settings)
    async with daemon_running(settings, engine) as daemon:
        await eventually(lambda: engine.state is EngineState.READY, what="engine ready")
        fake.served_model = "renamed-model"
        s3.put_object(Bucket=bucket, Key="input/b.png", Body=make_image(["Renamed model LIMA"], "PNG"))
        await eventually(lambda: engine.state is EngineState.FAILED, what="engine failed")
        assert engine.error is not None and MODEL in engine.error
        assert f"The model `{MODEL}` does not exist." in engine.error
        status, ready = await get(f"http://127.0.0.1:{daemon.http.port}/ready")
        assert status == 503 and MODEL in " ".join(ready["reasons"])
        await daemon.wait_polls(daemon.polls + 2, timeout=10)
        assert output_keys(s3, bucket) == set()
        fake.served_model = MODEL
        await wait_for_keys(s3, bucket, ["output/b.png.json"], timeout=60)
    assert not any(k.endswith(".error.json") for k in output_keys(s3, bucket))


async def test_server_errors_are_retried(
    weed: SeaweedS3, bucket: str, s3: Any, fake: FakeVlmServer
) -> None:
    settings = vlm_settings(weed, bucket, fake, vlm_max_retries=3)
    engine = fast_engine(settings)
    async with daemon_running(settings, engine):
        await eventually(lambda: engine.state is EngineState.READY, what="engine ready")
        fake.fail_next = 2
        s3.put_object(Bucket=bucket, Key="input/c.png", Body=make_image(["Retried page MIKE"], "PNG"))
        await wait_for_keys(s3, bucket, ["output/c.png.json"], timeout=60)
    assert fake.statuses.count(500) == 2
    assert fake.statuses[-3:] == [500, 500, 200]
    assert engine.unavailable is None
    assert contains_fuzzy(load_json(s3, bucket, "output/c.png.json")["markdown"], "Retried page MIKE")
    assert not any(k.endswith(".error.json") for k in output_keys(s3, bucket))


async def test_a_hanging_server_times_out_and_the_document_is_done_later(
    weed: SeaweedS3, bucket: str, s3: Any, fake: FakeVlmServer
) -> None:
    # Two attempts per request (one retry): two hung requests outlast the first try of
    # the document, which is deferred, then done once the server answers again.
    settings = vlm_settings(weed, bucket, fake, vlm_timeout=2, vlm_max_retries=1)
    engine = fast_engine(settings)
    # The mark lasts until the next health probe (0.2 s here): record it, not its window.
    marked = asyncio.Event()
    mark_unavailable = engine.mark_unavailable

    def mark(reason: str) -> None:
        marked.set()
        mark_unavailable(reason)

    engine.mark_unavailable = mark  # type: ignore[method-assign]
    async with daemon_running(settings, engine):
        await eventually(lambda: engine.state is EngineState.READY, what="engine ready")
        fake.hang_next, fake.hang_seconds = 2, 3.0
        s3.put_object(Bucket=bucket, Key="input/d.png", Body=make_image(["Slow server NOVEMBER"], "PNG"))
        await asyncio.wait_for(marked.wait(), 30)
        await wait_for_keys(s3, bucket, ["output/d.png.json"], timeout=60)
    assert fake.hang_next == 0
    assert fake.requests >= 1 + 3
    assert contains_fuzzy(load_json(s3, bucket, "output/d.png.json")["markdown"], "Slow server NOVEMBER")
    assert not any(k.endswith(".error.json") for k in output_keys(s3, bucket))


async def test_server_down_then_back(
    weed: SeaweedS3, bucket: str, s3: Any, fake: FakeVlmServer
) -> None:
    settings = vlm_settings(weed, bucket, fake, vlm_max_retries=1)
    engine = fast_engine(settings)
    async with daemon_running(settings, engine) as daemon:
        ready_url = f"http://127.0.0.1:{daemon.http.port}/ready"
        await eventually(lambda: engine.state is EngineState.READY, what="engine ready")
        await fake.stop()
        s3.put_object(Bucket=bucket, Key="input/e.png", Body=make_image(["Server came back OSCAR"], "PNG"))
        await eventually(lambda: engine.unavailable is not None, what="engine unavailable")
        status, ready = await get(ready_url)
        assert status == 503 and "unreachable" in " ".join(ready["reasons"])
        await daemon.wait_polls(daemon.polls + 2, timeout=10)
        assert output_keys(s3, bucket) == set()
        await fake.start()  # same port
        await wait_for_keys(s3, bucket, ["output/e.png.json"], timeout=60)
        status, _ = await get(ready_url)
        assert status == 200
    assert engine.unavailable is None
    assert output_keys(s3, bucket) == {"output/e.png.json", "output/e.png.md"}


async def test_requests_in_flight_never_exceed_the_bound(
    weed: SeaweedS3, bucket: str, s3: Any, fake: FakeVlmServer
) -> None:
    fake.delay = 0.3
    for n in range(3):
        pages = [[f"Doc {n} page {p}"] for p in range(3)]
        s3.put_object(Bucket=bucket, Key=f"input/doc{n}.pdf", Body=make_pdf(pages))
    settings = vlm_settings(weed, bucket, fake, vlm_max_concurrency=3,
                            max_inflight_documents=3, page_concurrency=4, render_dpi=50)
    engine = fast_engine(settings)
    async with daemon_running(settings, engine):
        await wait_for_keys(s3, bucket, [f"output/doc{n}.pdf.json" for n in range(3)], timeout=90)
    # Up to 9 pages were ready at once; the engine let exactly 3 through at a time.
    assert fake.max_inflight == 3
    assert fake.requests == 1 + 9


async def test_api_key_is_sent_as_bearer(
    weed: SeaweedS3, bucket: str, fake: FakeVlmServer
) -> None:
    settings = vlm_settings(weed, bucket, fake, vlm_api_key="vlm-secret-123",
                            vlm_prompt="Read this page.")
    assert "vlm-secret-123" in settings.secrets()
    engine = fast_engine(settings)
    await engine.start()
    try:
        assert engine.state is EngineState.READY, engine.error
    finally:
        await engine.close()
    assert fake.auth_headers == ["Bearer vlm-secret-123"]
    assert fake.prompts == ["Read this page."]


DOCTAGS = (
    "<doctag><page_header><loc_10><loc_5><loc_200><loc_15>ACME Corp</page_header>"
    "<title><loc_50><loc_20><loc_450><loc_40>Annual Report</title>"
    "<section_header_level_1><loc_50><loc_50><loc_300><loc_60>Summary</section_header_level_1>"
    "<text><loc_50><loc_70><loc_450><loc_100>Revenue grew strongly.</text>"
    "<unordered_list><list_item><loc_60><loc_110><loc_300><loc_120>first point</list_item>"
    "<list_item><loc_60><loc_121><loc_300><loc_130>second point</list_item></unordered_list>"
    "<otsl><loc_50><loc_140><loc_450><loc_200><ched>Year<ched>Value<nl><fcel>2024<fcel>10<nl>"
    "<fcel>2025<fcel>12<nl><caption><loc_50><loc_201><loc_450><loc_210>Table 1</caption></otsl>"
    "<formula><loc_50><loc_220><loc_300><loc_240>E = mc^2</formula>"
    "<picture><loc_10><loc_250><loc_200><loc_400></picture>"
    "<page_footer><loc_10><loc_480><loc_100><loc_490>Page 1</page_footer></doctag>"
)


def test_doctags_become_blocks_with_page_pixel_boxes() -> None:
    blocks, markdown = parse_doctags(DOCTAGS, 1000, 1400)
    assert [b.type for b in blocks] == [
        "page_header", "title", "section_header_level_1", "text", "list_item", "list_item",
        "otsl", "caption", "formula", "picture", "page_footer",
    ]
    title = blocks[1]
    assert title.text == "Annual Report"
    assert title.bbox == [100.0, 56.0, 900.0, 112.0]  # 0..500 grid scaled to 1000 x 1400
    table = blocks[6]
    assert table.extra["otsl"].startswith("<ched>Year") and table.extra["otsl_simple"] is True
    assert blocks[8].extra == {"latex": "E = mc^2"}
    assert [b.order for b in blocks] == list(range(len(blocks)))
    assert markdown == (
        "# Annual Report\n\n## Summary\n\nRevenue grew strongly.\n\n- first point\n- second point"
        "\n\n| Year | Value |\n| --- | --- |\n| 2024 | 10 |\n| 2025 | 12 |\n\nTable 1"
        "\n\n$$\nE = mc^2\n$$"
    )
    assert "ACME Corp" not in markdown and "Page 1" not in markdown


def test_spanning_otsl_table_keeps_the_raw_tokens() -> None:
    text = ("<doctag><otsl><loc_0><loc_0><loc_500><loc_500><ched>Name<lcel><nl>"
            "<fcel>a<fcel>b<nl></otsl></doctag>")
    blocks, markdown = parse_doctags(text, 500, 500)
    assert blocks[0].extra["otsl_simple"] is False
    assert "<lcel>" in blocks[0].extra["otsl"]
    assert markdown.startswith("| Name |  |")


def test_plain_text_answer_is_one_block_per_paragraph() -> None:
    page = text_page(2, 800, 600, "First paragraph\nstill first\n\nSecond one\n")
    assert [b.text for b in page.blocks] == ["First paragraph\nstill first", "Second one"]
    assert all(b.bbox == [0.0, 0.0, 800.0, 600.0] for b in page.blocks)
    assert page.raw == {"response": "First paragraph\nstill first\n\nSecond one\n"}


@pytest.mark.parametrize("managed", [True, False])
async def test_a_vlm_server_this_container_runs_gone_past_the_limit_fails_liveness(
    weed: SeaweedS3, bucket: str, s3: Any, fake: FakeVlmServer, managed: bool
) -> None:
    settings = vlm_settings(weed, bucket, fake, vlm_max_retries=1, vlm_managed=managed,
                            vlm_unreachable_limit=1)
    engine = fast_engine(settings)
    async with daemon_running(settings, engine) as daemon:
        health_url = f"http://127.0.0.1:{daemon.http.port}/health"
        await eventually(lambda: engine.state is EngineState.READY, what="engine ready")
        assert (await get(health_url))[0] == 200
        await fake.stop()
        s3.put_object(Bucket=bucket, Key="input/f.png", Body=make_image(["Waiting"], "PNG"))
        await eventually(lambda: engine.unavailable is not None, what="engine unavailable")
        if managed:
            answers: list[tuple[int, Any]] = []

            async def unhealthy() -> bool:
                answers.append(await get(health_url))
                return answers[-1][0] == 503

            try:
                await eventually(unhealthy, 30, "/health to answer 503", every=0.2)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the last answer: {answers[-1]}") from None
            assert "WATCHER_VLM_UNREACHABLE_LIMIT" in answers[-1][1]["problem"]
        else:
            # Someone else's server: however long it has been gone, only /ready says so.
            daemon.status.vlm_down_since = 0.0
            assert (await get(health_url))[0] == 200
        await fake.start()
        await wait_for_keys(s3, bucket, ["output/f.png.json"], timeout=60)
        assert (await get(health_url))[0] == 200


async def test_on_a_born_digital_page_text_blocks_take_the_layers_exact_text(
    weed: SeaweedS3, bucket: str, s3: Any, fake: FakeVlmServer
) -> None:
    lines = rudocs.RUSSIAN_TEXT[0][:4]
    s3.put_object(Bucket=bucket, Key="input/contract.pdf", Body=rudocs.ru_pdf([lines]))

    def misread(width: int, height: int) -> str:
        # DocTags on the 0..500 grid: a text block over the first two lines, read with
        # Latin letters and a wrong digit, and a table over the next two.
        def grid(px: float, size: int) -> int:
            return round(px / size * 500)
        text = "\n".join(rudocs.foreign_ocr(line) for line in lines[:2]).replace("4", "9")
        return (f"<doctag><text><loc_{grid(40, width)}><loc_{grid(115, height)}>"
                f"<loc_{grid(width - 40, width)}><loc_{grid(195, height)}>{text}</text>"
                f"<otsl><loc_{grid(40, width)}><loc_{grid(200, height)}><loc_{grid(width - 40, width)}>"
                f"<loc_{grid(265, height)}><fcel>Сторона<fcel>Подпись<nl></otsl></doctag>")

    fake.answer = misread
    settings = vlm_settings(weed, bucket, fake, render_dpi=150, vlm_prompt_preset="granite-docling",
                            chunks=True, outputs="docling")
    async with daemon_running(settings, create_engine(settings)):
        await wait_for_keys(s3, bucket, ["output/contract.pdf.json", "output/contract.pdf.docling.json",
                                         "output/contract.pdf.chunks.jsonl"], timeout=90)
    result = load_json(s3, bucket, "output/contract.pdf.json")
    jsonschema.validate(result, SCHEMA)
    page = result["pages"][0]
    text, table = page["blocks"]
    assert (text["text_source"], table["text_source"]) == ("text_layer", "engine")
    assert (text["kind"], table["kind"]) == ("paragraph", "table")
    assert (text["id"], table["id"]) == ("p1-b1", "p1-b2") and page["dpi"] == 150
    assert text["text"] == "\n".join(" ".join(line.split()) for line in lines[:2])
    assert table["type"] == "otsl" and "Сторона" in table["text"]  # the VLM's reading stays
    assert rudocs.foreign_ocr(lines[0]) not in result["markdown"]
    assert " ".join(lines[0].split()) in result["markdown"] and "Сторона" in result["markdown"]
    assert page["text_source"] == "ocr"  # the layout is the engine's
    # The table is a chunk of its own, and a table in the Docling export.
    body = s3.get_object(Bucket=bucket, Key="output/contract.pdf.chunks.jsonl")["Body"].read()
    assert [c["block_ids"] for c in map(json.loads, body.decode().splitlines())] == [["p1-b1"], ["p1-b2"]]
    from docling_core.types.doc import DoclingDocument

    exported = s3.get_object(Bucket=bucket, Key="output/contract.pdf.docling.json")["Body"].read()
    docling = DoclingDocument.model_validate_json(exported)
    assert [item.text for item in docling.texts] == [text["text"]]
    assert len(docling.tables) == 1 and docling.tables[0].data.num_rows >= 1


@pytest.mark.parametrize("loops_again", [False, True])
async def test_a_looping_answer_is_cut_early_asked_again_and_warned_of(
    weed: SeaweedS3, bucket: str, s3: Any, fake: FakeVlmServer, loops_again: bool
) -> None:
    s3.put_object(Bucket=bucket, Key="input/receipt.png", Body=make_image(["Receipt 17"], "PNG"))
    fake.answer = lambda _w, _h: "Итого по договору: 1 250,00 руб.\n"
    fake.loop = "Сумма прописью, "
    fake.loop_when_penalised = loops_again
    settings = vlm_settings(weed, bucket, fake)
    async with daemon_running(settings, create_engine(settings)):
        await wait_for_keys(s3, bucket, ["output/receipt.png.json"], timeout=90)
    result = load_json(s3, bucket, "output/receipt.png.json")
    jsonschema.validate(result, SCHEMA)
    # Asked once plainly, then once with a repetition penalty.
    assert fake.penalties == [None, REPETITION_PENALTY]
    # The loop was cut after a few hundred characters, not at max_tokens (4096 tokens):
    # the server saw the client hang up.
    looped = fake.streamed_chars[-2:] if loops_again else fake.streamed_chars[-2:-1]
    assert all(sent < 4000 for sent in looped), fake.streamed_chars
    text = result["pages"][0]["markdown"]
    assert text.startswith("Итого по договору: 1 250,00 руб.")
    if loops_again:
        assert [w["code"] for w in result["warnings"]] == ["repetition_cut"]
        assert text.count("Сумма прописью") == 1  # one unit of the loop is kept
    else:
        assert result["warnings"] == [] and "Сумма прописью" not in text


async def test_figures_are_written_beside_the_markdown_and_go_with_their_version(
    weed: SeaweedS3, bucket: str, s3: Any, fake: FakeVlmServer
) -> None:
    lines = rudocs.RUSSIAN_TEXT[0][:3]
    with_picture = True

    def doctags(width: int, height: int) -> str:
        # A text block over the first lines and, below it, a picture 400 x 300 pixels.
        def grid(px: float, size: int) -> int:
            return round(px / size * 500)
        text = (f"<text><loc_{grid(40, width)}><loc_{grid(115, height)}><loc_{grid(width - 40, width)}>"
                f"<loc_{grid(230, height)}>{' '.join(lines)}</text>")
        picture = (f"<picture><loc_{grid(100, width)}><loc_{grid(400, height)}><loc_{grid(500, width)}>"
                   f"<loc_{grid(700, height)}></picture>") if with_picture else ""
        return f"<doctag>{text}{picture}</doctag>"

    fake.answer = doctags
    s3.put_object(Bucket=bucket, Key="input/deals/contract.pdf", Body=rudocs.ru_pdf([lines]))
    settings = vlm_settings(weed, bucket, fake, render_dpi=150, vlm_prompt_preset="granite-docling")
    asset = "output/deals/contract.pdf.assets/page-1-figure-1.png"
    async with daemon_running(settings, create_engine(settings)):
        await wait_for_keys(s3, bucket, ["output/deals/contract.pdf.json", asset], timeout=90)
        result = load_json(s3, bucket, "output/deals/contract.pdf.json")
        markdown = s3.get_object(Bucket=bucket, Key="output/deals/contract.pdf.md")["Body"].read().decode()
        png = Image.open(io.BytesIO(s3.get_object(Bucket=bucket, Key=asset)["Body"].read()))
        # A new version without the picture: its result no longer has the old figure.
        with_picture = False
        s3.put_object(Bucket=bucket, Key="input/deals/contract.pdf", Body=rudocs.ru_pdf([lines[:2]]))
        await eventually(lambda: not object_exists(s3, bucket, asset), 90,
                         "the old version's figure to be removed", every=0.3)
    jsonschema.validate(result, SCHEMA)
    picture = result["pages"][0]["blocks"][1]
    assert picture["kind"] == "figure" and picture["asset"] == "contract.pdf.assets/page-1-figure-1.png"
    assert "](contract.pdf.assets/page-1-figure-1.png)" in markdown  # relative: beside the Markdown
    assert abs(png.width - 400) <= 4 and abs(png.height - 300) <= 4  # cropped at the page's resolution
    replaced = load_json(s3, bucket, "output/deals/contract.pdf.json")
    assert [b["kind"] for b in replaced["pages"][0]["blocks"]] == ["paragraph"]

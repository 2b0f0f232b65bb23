"""Readable results on real-shaped documents: Russian text, text layers, scans, rotation,
faults kept to the page, warnings instead of silent empty results, clean error records.

Documents come from tests/rudocs.py with known text; OCR is the real CPU engine.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import rudocs
from conftest import CountingEngine, daemon_running, make_settings, wait_for_keys
from PIL import Image

from watcher.cli.embedded import SeaweedS3
from watcher.core.errors import DocumentError, ErrorCode, scrub
from watcher.core.pages import RenderedPage
from watcher.core.refs import ObjectRef
from watcher.engines.cpu import CpuReader, find_tessdata, settle_scripts
from watcher.pipeline import repair
from watcher.pipeline.decode import Limits, open_document
from watcher.pipeline.recognise import unreadable
from watcher.pipeline.result import error_record
from watcher.pipeline.textlayer import TextLayer

pytestmark = pytest.mark.e2e  # real OCR through the CPU engine

RESULT_SCHEMA = json.loads((Path(__file__).parent.parent / "watcher/schema/result-v2.json").read_text())
LIMITS = Limits(max_pages=100, max_page_pixels=60_000_000, render_dpi=150)
PAGE = rudocs.RUSSIAN_TEXT[0]
TRUTH = "\n".join(PAGE)


def opened(tmp_path: Path, data: bytes, name: str = "doc.pdf") -> Any:
    path = tmp_path / name
    path.write_bytes(data)
    return open_document(path, len(data), LIMITS, key=f"input/{name}")


def layer(tmp_path: Path, data: bytes, index: int = 0) -> TextLayer:
    found = opened(tmp_path, data).text_layer(index)
    assert found is not None
    return found


@pytest.fixture(scope="module")
def reader() -> CpuReader:
    return CpuReader()


# --- the text layer ---------------------------------------------------------------------

@pytest.mark.parametrize("font", ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"])
def test_a_born_digital_russian_page_is_read_exactly_from_its_text_layer(tmp_path: Path, font: str) -> None:
    found = layer(tmp_path, rudocs.ru_pdf([PAGE], font=font, size=11))
    assert found.trusted, found.stats
    assert found.result.text_source == "text_layer"
    assert rudocs.similarity(TRUTH, found.result.markdown) == 1.0
    result = found.result
    assert [b.text for b in result.blocks] == [" ".join(line.split()) for line in PAGE]
    for block in result.blocks:  # boxes in the rendered page's pixel frame, top to bottom
        x0, y0, x1, y1 = block.bbox
        assert 0 <= x0 < x1 <= result.width and 0 <= y0 < y1 <= result.height
    tops = [b.bbox[1] for b in result.blocks]
    assert tops == sorted(tops)


def test_text_layer_boxes_match_the_ocr_frame(tmp_path: Path, reader: CpuReader) -> None:
    doc = opened(tmp_path, rudocs.ru_pdf([PAGE], size=12))
    from_layer = doc.text_layer(0).result
    page = doc.render(0)
    from_ocr = reader.recognise(page)
    assert (from_layer.width, from_layer.height) == (page.width, page.height)
    # The first line is found at the same place both ways (within a few pixels).
    first = zip(from_layer.blocks[0].bbox, from_ocr.blocks[0].bbox, strict=True)
    assert all(abs(a - b) < 12 for a, b in first)


@pytest.mark.parametrize(("how", "reason"), [("latin1", "mojibake"), ("pua", "garbled"), ("none", "garbled")])
def test_a_garbage_text_layer_is_not_trusted(tmp_path: Path, how: str, reason: str) -> None:
    found = layer(tmp_path, rudocs.pdf_garbage_text_layer(PAGE, how=how))
    assert not found.trusted and found.reason == reason, found.stats


def test_scans_and_pictures_with_captions_are_not_taken_from_the_text_layer(tmp_path: Path) -> None:
    scan = rudocs.scan_pdf(rudocs.render_pages(rudocs.ru_pdf([PAGE]), dpi=100))
    assert layer(tmp_path, scan).reason == "no_text_layer"
    caption = "Рисунок 1. Скан договора поставки, подписанного сторонами"
    mostly = rudocs.pdf_mostly_image_with_caption(PAGE[:15], caption)
    found = layer(tmp_path, mostly)
    assert not found.trusted and found.reason == "mostly_image", found.stats


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_a_page_shown_turned_by_its_rotate_entry_reads_upright(tmp_path: Path, degrees: int) -> None:
    found = layer(tmp_path, rudocs.rotate_flag_pdf(rudocs.ru_pdf([PAGE]), degrees))
    assert found.trusted
    assert found.result.rotation == degrees
    assert rudocs.similarity(TRUTH, found.result.markdown) == 1.0
    portrait = found.result.height > found.result.width
    assert portrait  # the turned frame is the A4 page the text was written on


def test_a_line_hyphenated_at_its_end_keeps_its_hyphen_and_break(tmp_path: Path) -> None:
    lines = ["Поставщик обязуется передать товар в соб-", "ственность покупателя в срок."]
    found = layer(tmp_path, rudocs.ru_pdf([lines]))
    assert [b.text for b in found.result.blocks] == lines


# --- decoding faults ---------------------------------------------------------------------

@pytest.mark.parametrize("data", [rudocs.zero_area_pdf(), rudocs.zero_area_pdf(mediabox=(0, 0, 0, 0)),
                                  rudocs.huge_page_pdf()], ids=["no-height", "no-area", "2^31-pt"])
def test_degenerate_pages_are_rejected_before_any_engine(tmp_path: Path, data: bytes) -> None:
    doc = opened(tmp_path, data)
    for read in (doc.render, doc.text_layer):
        with pytest.raises(DocumentError) as info:
            read(0)
        assert info.value.code is ErrorCode.BAD_PAGE_GEOMETRY


def test_a_page_squeezed_below_legible_resolution_says_so(tmp_path: Path) -> None:
    plan = rudocs.hand_pdf([b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
                            b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 14000 9000]>>"])
    path = tmp_path / "plan.pdf"
    path.write_bytes(plan)
    doc = open_document(path, len(plan), Limits(max_pages=10, max_page_pixels=20_000_000, render_dpi=150))
    page = doc.render(0)
    assert page.width * page.height <= 20_000_000
    assert [w["code"] for w in page.warnings] == ["low_resolution"]
    roomy = open_document(path, len(plan), Limits(max_pages=10, max_page_pixels=10**9, render_dpi=72))
    assert roomy.text_layer(0).result.width == 14000  # the same frame the render would have


# PDFium opens it, then counts no pages: pypdfium2 reported whatever error came before.
EMPTY_PAGE_TREE = rudocs.hand_pdf([b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[]/Count 0>>"])


def test_pdfium_errors_belong_to_the_document_that_caused_them(tmp_path: Path) -> None:
    encrypted = rudocs.ru_pdf([PAGE], password="sekret")
    for _ in range(2):
        with pytest.raises(DocumentError) as info:
            opened(tmp_path, encrypted, "locked.pdf")
        assert info.value.code is ErrorCode.ENCRYPTED
        # Right after it: a readable PDF opens, and one without pages is not "encrypted".
        assert opened(tmp_path, rudocs.ru_pdf([PAGE]), "fine.pdf").page_count == 1
        with pytest.raises(DocumentError) as info:
            opened(tmp_path, encrypted, "locked.pdf")
        with pytest.raises(DocumentError) as info:
            opened(tmp_path, EMPTY_PAGE_TREE, "empty.pdf")
        assert info.value.code is ErrorCode.CORRUPT
        assert "no pages" in info.value.message and "Success" not in info.value.message


def test_damage_the_decoder_reports_becomes_a_warning_or_a_page_error(tmp_path: Path) -> None:
    page = opened(tmp_path, rudocs.broken_tiff(compression="group4"), "fax.tiff").render(0)
    assert [w["code"] for w in page.warnings] == ["decoder_warning"]
    assert "Bad code word" in page.warnings[0]["message"]
    for data, name in ((rudocs.broken_tiff(), "lzw.tiff"), (rudocs.broken_rle_bmp(), "rle.bmp")):
        with pytest.raises(DocumentError) as info:
            opened(tmp_path, data, name).render(0)
        assert info.value.code is ErrorCode.CORRUPT
        assert str(tmp_path) not in info.value.message


def test_white_text_on_transparency_stays_visible(tmp_path: Path, reader: CpuReader) -> None:
    lines = ["Белый текст на прозрачном фоне", "White text on a transparent PNG"]
    page = opened(tmp_path, rudocs.transparent_png_white_text(lines), "white.png").render(0)
    assert page.image.getpixel((0, 0)) == (0, 0, 0)  # dark behind light content
    assert rudocs.similarity("\n".join(lines), reader.recognise(page).markdown) > 0.9


def test_local_paths_never_reach_a_message() -> None:
    assert scrub("cannot identify image file '/tmp/watcher-work/12-ab/x.png'") == (
        "cannot identify image file '<file>'")
    assert scrub("see http://vlm:8080/v1/models, 1/2 done") == "see http://vlm:8080/v1/models, 1/2 done"
    ref = ObjectRef(bucket="b", key="input/x.png", etag="e", size=1)
    record = error_record(ref, ErrorCode.ENGINE_FAILED, "crash in /opt/venv/lib/python3.11/x.py", 3)
    assert "/opt" not in json.dumps(record)


def test_a_document_is_an_error_only_when_no_page_could_be_read() -> None:
    from watcher.core.pages import PageResult

    good = PageResult(index=0, width=10, height=10, blocks=[], markdown="")
    bad = PageResult(index=1, width=0, height=0, blocks=[], markdown="",
                     error={"code": "corrupt", "message": "page 2 cannot be loaded"})
    assert unreadable([good, bad]) is None
    failure = unreadable([bad])
    assert failure is not None and failure.code is ErrorCode.CORRUPT
    assert failure.message == "page 2 cannot be loaded"


def test_letters_alike_in_both_scripts_follow_the_words_around_them() -> None:
    assert settle_scripts("АКТ приёмки CCCP", None) == "АКТ приёмки СССР"
    assert settle_scripts("Long document раде 3", None) == "Long document page 3"
    assert settle_scripts("The page was copied by а reader", None) == "The page was copied by a reader"
    assert settle_scripts("ISO 9001 и PDF", None) == "ISO 9001 и PDF"  # I, S, D have no twins
    assert settle_scripts("OOO", "cyrillic") == "ООО"  # a line without its own clue: the page's


# --- OCR: Russian, scans, orientation ------------------------------------------------------

@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
def test_degraded_russian_scans_are_read_upright(reader: CpuReader, degrees: int) -> None:
    image = rudocs.degrade(rudocs.render_pages(rudocs.ru_pdf([PAGE]), dpi=150)[0], seed=degrees)
    turned = image.rotate(-degrees, expand=True, fillcolor="white").convert("RGB")
    result = reader.recognise(RenderedPage(0, turned, turned.width, turned.height))
    assert result.rotation == degrees
    assert rudocs.similarity(TRUTH, result.markdown) > 0.95, result.markdown
    letters = [c for c in result.markdown if c.isalpha()]
    assert sum("а" <= c.lower() <= "я" or c in "ёЁ" for c in letters) / len(letters) > 0.8


# --- through the daemon ----------------------------------------------------------------------

def _json(s3: Any, bucket: str, key: str) -> Any:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


async def test_real_shaped_documents_through_the_daemon(weed: SeaweedS3, bucket: str, s3: Any) -> None:
    mixed = rudocs.MIXED_TEXT[0]
    docs: dict[str, bytes] = {
        "born-digital.pdf": rudocs.ru_pdf([PAGE, mixed]),
        "scan.pdf": rudocs.rotated_scan_pdf(rudocs.ru_pdf([PAGE]), 90, dpi=150, seed=3),
        "one-bad-page.pdf": rudocs.pdf_with_broken_page(PAGE[:6], how="not-a-page"),
        "not-embedded.pdf": rudocs.pdf_nonembedded_font(),
        "locked.pdf": rudocs.ru_pdf([PAGE], password="sekret"),
        "after-locked.pdf": rudocs.ru_pdf([mixed]),
        "tall.pdf": rudocs.huge_page_pdf(),
        "blank.png": rudocs.image_bytes(Image.new("RGB", (800, 600), "white"), "PNG"),
        "fax.tiff": rudocs.broken_tiff(compression="group4"),
    }
    for name, body in docs.items():
        s3.put_object(Bucket=bucket, Key=f"input/{name}", Body=body)
    engine = CountingEngine()
    settings = make_settings(weed, bucket, render_dpi=150, max_inflight_documents=1)
    async with daemon_running(settings, engine):
        await wait_for_keys(s3, bucket, [
            *(f"output/{n}.json" for n in docs if n not in ("locked.pdf", "tall.pdf")),
            "output/locked.pdf.error.json", "output/tall.pdf.error.json"])

    results = {n: _json(s3, bucket, f"output/{n}.json") for n in docs if n not in ("locked.pdf", "tall.pdf")}
    for result in results.values():
        jsonschema.validate(result, RESULT_SCHEMA)

    born = results["born-digital.pdf"]
    assert [p["text_source"] for p in born["pages"]] == ["text_layer", "text_layer"]
    for page in born["pages"]:  # boxes that travel: the resolution, and shares of the page
        assert page["dpi"] == 150
        for block in page["blocks"]:
            for share, pixels, side in zip(block["bbox_norm"], block["bbox"], ("width", "height") * 2,
                                           strict=True):
                assert abs(share * page[side] - pixels) < 0.01 * page[side]
            assert block["kind"] == "paragraph" and block["id"].startswith(f"p{page['index'] + 1}-b")
    assert results["blank.png"]["pages"][0]["dpi"] is None  # the PNG says no resolution
    assert rudocs.similarity(TRUTH, born["pages"][0]["markdown"]) == 1.0
    assert rudocs.similarity("\n".join(mixed), born["pages"][1]["markdown"]) == 1.0

    scan = results["scan.pdf"]["pages"][0]
    assert scan["text_source"] == "ocr" and scan["rotation"] in (90, 270)
    assert rudocs.similarity(TRUTH, scan["markdown"]) > 0.95

    broken = results["one-bad-page.pdf"]["pages"]
    assert rudocs.similarity("\n".join(PAGE[:6]), broken[0]["markdown"]) == 1.0
    assert broken[1]["error"]["code"] == "corrupt" and broken[1]["blocks"] == []

    # Renders blank with the CPU engine's fonts, but its text layer holds the text.
    blank_font = results["not-embedded.pdf"]["pages"][0]
    assert blank_font["text_source"] == "text_layer"
    assert rudocs.similarity("\n".join(rudocs.CYRILLIC_ONLY), blank_font["markdown"]) == 1.0

    locked = _json(s3, bucket, "output/locked.pdf.error.json")["error"]
    assert locked["code"] == "encrypted"
    assert rudocs.similarity("\n".join(mixed), results["after-locked.pdf"]["pages"][0]["markdown"]) == 1.0
    tall = _json(s3, bucket, "output/tall.pdf.error.json")["error"]
    assert tall["code"] == "bad_page_geometry"

    blank = results["blank.png"]
    assert blank["pages"][0]["blocks"] == []
    assert [w["code"] for w in blank["warnings"]] == ["no_text"]
    fax = results["fax.tiff"]
    assert "decoder_warning" in [w["code"] for w in fax["warnings"]]

    # Only pages without a trustworthy text layer reached the engine: the scan, the blank
    # image and the fax (the degenerate page never did).
    assert len(engine.calls) == 3


async def test_ocr_mode_reads_every_page_and_says_when_it_found_nothing(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    s3.put_object(Bucket=bucket, Key="input/not-embedded.pdf", Body=rudocs.pdf_nonembedded_font())
    s3.put_object(Bucket=bucket, Key="input/text.pdf", Body=rudocs.ru_pdf([PAGE[:4]]))
    engine = CountingEngine()
    async with daemon_running(make_settings(weed, bucket, text_layer="ocr", render_dpi=150), engine):
        await wait_for_keys(s3, bucket, ["output/not-embedded.pdf.json", "output/text.pdf.json"])
    assert len(engine.calls) == 2
    blank = _json(s3, bucket, "output/not-embedded.pdf.json")
    assert blank["pages"][0]["text_source"] == "ocr"
    assert [w["code"] for w in blank["warnings"]] == ["no_text"]
    text = _json(s3, bucket, "output/text.pdf.json")
    assert text["pages"][0]["text_source"] == "ocr"
    assert rudocs.similarity("\n".join(PAGE[:4]), text["pages"][0]["markdown"]) > 0.97


async def test_text_mode_never_sends_a_pdf_page_to_the_engine(weed: SeaweedS3, bucket: str, s3: Any) -> None:
    s3.put_object(Bucket=bucket, Key="input/scan.pdf",
                  Body=rudocs.scan_pdf(rudocs.render_pages(rudocs.ru_pdf([PAGE]), dpi=100)))
    s3.put_object(Bucket=bucket, Key="input/garbled.pdf",
                  Body=rudocs.pdf_garbage_text_layer(PAGE, how="latin1"))
    engine = CountingEngine()
    async with daemon_running(make_settings(weed, bucket, text_layer="text"), engine):
        await wait_for_keys(s3, bucket, ["output/scan.pdf.json", "output/garbled.pdf.json"])
    assert engine.calls == []
    scan = _json(s3, bucket, "output/scan.pdf.json")
    assert [w["code"] for w in scan["warnings"]] == ["no_text"]
    garbled = _json(s3, bucket, "output/garbled.pdf.json")
    assert [w["code"] for w in garbled["warnings"]] == ["text_layer_untrusted"]


# --- text layers judged by their words ---------------------------------------------------------

async def test_a_text_layer_that_is_not_words_is_replaced_by_the_engines_reading(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    docs = {
        # An archive scan with an invisible layer by an OCR that knew no Russian.
        "foreign-ocr.pdf": rudocs.ocr_layer_scan_pdf(PAGE),
        # The same scan whose invisible layer is right: taken as it is, not OCRed.
        "good-ocr.pdf": rudocs.ocr_layer_scan_pdf(PAGE, PAGE),
        # Born digital, a font that maps Cyrillic glyphs to the Latin letters drawn alike.
        "lookalike.pdf": rudocs.pdf_lookalike_text_layer(PAGE),
        # Its page tree cannot be reached: repaired, and said so.
        "lost-tree.pdf": rudocs.pdf_broken_page_tree([PAGE], "pages_ref"),
    }
    for name, body in docs.items():
        s3.put_object(Bucket=bucket, Key=f"input/{name}", Body=body)
    engine = CountingEngine()
    settings = make_settings(weed, bucket, render_dpi=150, max_inflight_documents=1)
    async with daemon_running(settings, engine):
        await wait_for_keys(s3, bucket, [f"output/{n}.json" for n in docs])
    results = {n: _json(s3, bucket, f"output/{n}.json") for n in docs}
    for result in results.values():
        jsonschema.validate(result, RESULT_SCHEMA)

    foreign = results["foreign-ocr.pdf"]
    assert foreign["pages"][0]["text_source"] == "ocr"
    assert rudocs.similarity(TRUTH, foreign["pages"][0]["markdown"]) > 0.9
    replaced = [w for w in foreign["warnings"] if w["code"] == "text_layer_replaced"]
    assert len(replaced) == 1 and "earlier OCR" in replaced[0]["message"], foreign["warnings"]
    assert "rus+eng" in replaced[0]["message"]

    good = results["good-ocr.pdf"]
    assert good["pages"][0]["text_source"] == "text_layer" and good["warnings"] == []
    assert rudocs.similarity(TRUTH, good["pages"][0]["markdown"]) == 1.0

    lookalike = results["lookalike.pdf"]
    assert lookalike["pages"][0]["text_source"] == "ocr"
    assert rudocs.similarity(TRUTH, lookalike["pages"][0]["markdown"]) > 0.95
    assert [w["code"] for w in lookalike["warnings"]] == ["text_layer_replaced"]
    assert "mix Latin and Cyrillic" in lookalike["warnings"][0]["message"]
    lost = results["lost-tree.pdf"]
    assert lost["pages"][0]["text_source"] == "text_layer"
    assert rudocs.similarity(TRUTH, lost["pages"][0]["markdown"]) == 1.0
    assert [(w["code"], w["page"]) for w in lost["warnings"]] == [("repaired", 0)]
    assert len(engine.calls) == 2  # the good layer cost no OCR


# --- damaged PDFs repaired ------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["pages_ref", "root_ref", "no_tree"])
def test_a_pdf_whose_page_tree_cannot_be_reached_is_repaired(tmp_path: Path, how: str) -> None:
    mixed = rudocs.MIXED_TEXT[0]
    doc = opened(tmp_path, rudocs.pdf_broken_page_tree([PAGE, mixed], how))
    assert doc.page_count == 2
    assert [w["code"] for w in doc.warnings] == ["repaired"]
    assert "new catalog" in doc.warnings[0]["message"]
    found = doc.text_layer(1)
    assert found.trusted and rudocs.similarity("\n".join(mixed), found.result.markdown) == 1.0
    assert doc.render(0).width > 0
    doc.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.pdf"]  # no repaired copy left


def test_qpdf_rewrites_what_it_can_read_and_gives_up_on_the_rest(tmp_path: Path) -> None:
    good = rudocs.ru_pdf([PAGE, rudocs.MIXED_TEXT[0]])
    damaged_xref = good[:good.rfind(b"xref")] + b"xref\n0 3\nzzzz\ntrailer\n<< >>\nstartxref\n12\n%%EOF\n"
    (tmp_path / "xref.pdf").write_bytes(damaged_xref)
    rewritten = repair.with_qpdf(tmp_path / "xref.pdf")
    assert rewritten is not None
    copy = opened(tmp_path, rewritten.read_bytes(), "copy.pdf")
    assert copy.page_count == 2 and not copy.warnings
    copy.close()
    # No page tree (qpdf finds none), a password, no PDF objects at all: nothing to rewrite.
    (tmp_path / "lost.pdf").write_bytes(rudocs.pdf_broken_page_tree([PAGE], "root_ref"))
    (tmp_path / "locked.pdf").write_bytes(rudocs.ru_pdf([PAGE], password="sekret"))
    (tmp_path / "junk.pdf").write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 8)
    for name in ("lost.pdf", "locked.pdf", "junk.pdf"):
        assert repair.with_qpdf(tmp_path / name) is None, name
    assert repair.with_new_catalog(tmp_path / "junk.pdf") is None
    with pytest.raises(DocumentError) as locked:
        opened(tmp_path, rudocs.ru_pdf([PAGE], password="sekret"), "locked-again.pdf")
    assert locked.value.code is ErrorCode.ENCRYPTED  # never "repaired"
    with pytest.raises(DocumentError) as junk:
        opened(tmp_path, (tmp_path / "junk.pdf").read_bytes(), "junk-again.pdf")
    assert junk.value.code is ErrorCode.CORRUPT


# --- pages in a script the configured languages do not write ------------------------------------

GREEK = ["Η σύμβαση προμήθειας υπογράφεται από τα δύο μέρη",
         "Ο προμηθευτής παραδίδει τα εμπορεύματα εντός δέκα ημερών",
         "Η πληρωμή γίνεται με τραπεζική μεταφορά στον λογαριασμό"] * 3


def page_of(lines: list[str]) -> RenderedPage:
    image = rudocs.render_pages(rudocs.ru_pdf([lines]), 150)[0]
    return RenderedPage(0, image, *image.size)


def test_a_page_in_a_script_not_configured_is_read_with_its_language_when_installed() -> None:
    english_only = CpuReader(languages="eng")
    result = english_only.recognise(page_of(PAGE))
    assert [w["code"] for w in result.warnings] == ["language_not_covered"]
    message = result.warnings[0]["message"]
    assert "Cyrillic" in message and "read with `rus`" in message and "WATCHER_OCR_LANGUAGES=eng" in message
    assert rudocs.similarity(TRUTH, result.markdown) > 0.95


def test_a_page_in_a_script_with_no_language_installed_says_which_package_reads_it(
    tmp_path: Path, reader: CpuReader
) -> None:
    assert reader.recognise(page_of(PAGE)).warnings == []  # Cyrillic: rus+eng covers it
    assert reader.recognise(page_of(rudocs.MIXED_TEXT[0])).warnings == []
    # Tesseract's data without Greek, wherever this machine keeps its languages.
    tessdata = tmp_path / "tessdata"
    tessdata.mkdir()
    for lang in ("rus", "eng", "osd"):
        (tessdata / f"{lang}.traineddata").symlink_to(find_tessdata("rus+eng") / f"{lang}.traineddata")
    result = CpuReader(languages="rus+eng", tessdata=str(tessdata)).recognise(page_of(GREEK))
    assert [w["code"] for w in result.warnings] == ["language_not_covered"]
    message = result.warnings[0]["message"]
    assert "Greek" in message and "tesseract-ocr-ell" in message and "`ell`" in message


async def test_chunks_of_a_long_document_follow_its_pages_and_stay_within_size(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    pages = [PAGE, rudocs.MIXED_TEXT[0], PAGE]
    s3.put_object(Bucket=bucket, Key="input/contract.pdf", Body=rudocs.ru_pdf(pages))
    settings = make_settings(weed, bucket, render_dpi=150, chunks=True, chunk_tokens=120, outputs="docling")
    async with daemon_running(settings, CountingEngine()):
        await wait_for_keys(s3, bucket, ["output/contract.pdf.json", "output/contract.pdf.chunks.jsonl",
                                         "output/contract.pdf.docling.json"])
    result = _json(s3, bucket, "output/contract.pdf.json")
    body = s3.get_object(Bucket=bucket, Key="output/contract.pdf.chunks.jsonl")["Body"].read()
    chunks = [json.loads(line) for line in body.decode("utf-8").splitlines()]
    blocks = {b["id"]: (p["index"], b) for p in result["pages"] for b in p["blocks"]}
    assert all(c["tokens"] <= 120 for c in chunks)
    # Every block's text is in exactly one chunk, in reading order, with its page and box.
    assert [i for c in chunks for i in c["block_ids"]] == list(blocks)
    for chunk in chunks:
        for block_id, box in zip(chunk["block_ids"], chunk["boxes"], strict=True):
            page, block = blocks[block_id]
            assert box == {"page": page, "bbox_norm": block["bbox_norm"]} and page in chunk["pages"]
            assert block["text"] in chunk["text"]
    assert {p for c in chunks for p in c["pages"]} == {0, 1, 2}
    # The Docling export loads with docling-core, and holds the same text on the same pages.
    from docling_core.types.doc import DoclingDocument

    exported = s3.get_object(Bucket=bucket, Key="output/contract.pdf.docling.json")["Body"].read()
    docling = DoclingDocument.model_validate_json(exported)
    assert sorted(docling.pages) == [1, 2, 3]
    texts = [item.text for item in docling.texts]
    assert texts == [b["text"] for p in result["pages"] for b in p["blocks"]]
    for item in docling.texts:
        (prov,) = item.prov
        page = docling.pages[prov.page_no]
        assert 0 <= prov.bbox.l < prov.bbox.r <= page.size.width + 1  # points, top-left origin
        assert 0 <= prov.bbox.t < prov.bbox.b <= page.size.height + 1
    assert abs(docling.pages[1].size.width - 595.3) < 1  # an A4 page, in points
    assert " ".join(PAGE[0].split()) in docling.export_to_markdown()


async def test_figures_on_scans_and_born_digital_pages_are_written_beside_the_markdown(
    weed: SeaweedS3, bucket: str, s3: Any
) -> None:
    lines = PAGE[:6]
    born = rudocs.pdf_with_picture(lines)
    docs = {"born.pdf": born, "scan.pdf": rudocs.scan_pdf(rudocs.render_pages(born, 150))}
    for name, body in docs.items():
        s3.put_object(Bucket=bucket, Key=f"input/{name}", Body=body)
    settings = make_settings(weed, bucket, render_dpi=150)
    assets = [f"output/{name}.assets/page-1-figure-1.png" for name in docs]
    async with daemon_running(settings, CountingEngine()):
        await wait_for_keys(s3, bucket, [*(f"output/{n}.json" for n in docs), *assets])
    for name in docs:
        result = _json(s3, bucket, f"output/{name}.json")
        jsonschema.validate(result, RESULT_SCHEMA)
        (figure,) = [b for b in result["pages"][0]["blocks"] if b["kind"] == "figure"]
        assert figure["asset"] == f"{name}.assets/page-1-figure-1.png"
        markdown = s3.get_object(Bucket=bucket, Key=f"output/{name}.md")["Body"].read().decode()
        assert f"]({name}.assets/page-1-figure-1.png)" in markdown
        asset = s3.get_object(Bucket=bucket, Key=f"output/{name}.assets/page-1-figure-1.png")
        png = Image.open(io.BytesIO(asset["Body"].read()))
        if name == "born.pdf":  # the PDF says where its picture is
            assert abs(png.width - 400) <= 12 and abs(png.height - 300) <= 12, png.size
        else:  # Tesseract's layout analysis finds most of it
            assert 0.5 <= png.width * png.height / (400 * 300) <= 1.1, png.size
        # The text is all there, and the figure comes after it in reading order.
        page_markdown = result["pages"][0]["markdown"]
        assert rudocs.similarity("\n".join(lines), page_markdown.split("![")[0]) > 0.95
    assert _json(s3, bucket, "output/born.pdf.json")["pages"][0]["text_source"] == "text_layer"

"""Small pieces on their own: format sniffing, reading order, names, redaction, settings."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import rudocs
from docgen import make_image, make_pdf, make_tiff
from PIL import Image

from watcher.bucket.names import Names, shard_of
from watcher.core.errors import DocumentError, ErrorCode
from watcher.core.identity import INCARNATION
from watcher.core.logs import REDACTED, SecretScrubber
from watcher.core.pages import Block, PageResult
from watcher.core.settings import SettingsError, load_settings
from watcher.engines.cpu import paragraphs_to_markdown
from watcher.pipeline import words
from watcher.pipeline.chunks import chunks_of, to_jsonl
from watcher.pipeline.decode import Format, Limits, open_document, sniff
from watcher.pipeline.docling_export import docling_document
from watcher.pipeline.fetch import prepare_work_dir
from watcher.pipeline.structure import normalised, structured_blocks

LIMITS = Limits(max_pages=10, max_page_pixels=10_000_000, render_dpi=100)
REQUIRED = {"s3_endpoint": "http://127.0.0.1:9", "s3_bucket": "docs",
            "s3_access_key": "tenant:key", "s3_secret_key": "secret-secret"}


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (make_pdf([["x"]]), Format.PDF),
        (make_image(["x"], "PNG"), Format.PNG),
        (make_image(["x"], "JPEG"), Format.JPEG),
        (make_tiff([["x"]]), Format.TIFF),
        (make_image(["x"], "BMP"), Format.BMP),
        (make_image(["x"], "WEBP"), Format.WEBP),
        (b"hello world", None),
        (b"PK\x03\x04", None),
    ],
)
def test_sniff_reads_content_not_names(data: bytes, fmt: Format | None) -> None:
    assert sniff(data[:2048]) is fmt


def test_multi_page_tiff_pages_render_one_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "scan.tif"
    path.write_bytes(make_tiff([["one"], ["two"], ["three"]]))
    doc = open_document(path, path.stat().st_size, LIMITS)
    assert doc.format is Format.TIFF and doc.page_count == 3
    pages = [doc.render(i) for i in range(3)]
    assert [p.index for p in pages] == [0, 1, 2]
    assert all(p.image.mode == "RGB" and p.width == 1000 for p in pages)
    doc.close()


def test_transparent_png_is_flattened_on_white(tmp_path: Path) -> None:
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (40, 30), (0, 0, 0, 0)).save(path)
    doc = open_document(path, path.stat().st_size, LIMITS)
    assert doc.render(0).image.getpixel((5, 5)) == (255, 255, 255)
    doc.close()


def test_a_poster_sized_pdf_page_is_scaled_under_the_pixel_limit(tmp_path: Path) -> None:
    from fpdf import FPDF

    pdf = FPDF(format=(2000, 2000))  # millimetres: a 2 m square poster
    pdf.add_page()
    path = tmp_path / "poster.pdf"
    path.write_bytes(bytes(pdf.output()))
    doc = open_document(path, path.stat().st_size, LIMITS)
    page = doc.render(0)
    assert page.width * page.height <= LIMITS.max_page_pixels
    doc.close()


def test_open_document_rejects_with_codes(tmp_path: Path) -> None:
    cases = {
        "empty.pdf": (b"", ErrorCode.EMPTY),
        "junk.pdf": (b"%PDF-1.4 nothing useful", ErrorCode.CORRUPT),
        "many.pdf": (make_pdf([["p"]] * 11), ErrorCode.TOO_MANY_PAGES),
        "text.png": (b"not an image at all", ErrorCode.UNSUPPORTED_FORMAT),
    }
    for name, (data, code) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DocumentError) as info:
            open_document(path, len(data), LIMITS, key=f"input/{name}")
        assert info.value.code is code, name


def block(text: str, paragraph: int) -> Block:
    return Block(type="text", bbox=[0, 0, 1, 1], text=text, extra={"paragraph": paragraph})


def test_lines_of_one_paragraph_stay_together() -> None:
    blocks = [block("Hello world", 0), block("second line", 0), block("new paragraph", 1)]
    assert paragraphs_to_markdown(blocks) == "Hello world\nsecond line\n\nnew paragraph"


def test_layout_keys_keep_the_relative_path() -> None:
    names = Names("input/", "output/", ".watcher/leases/", "done/")
    key = "input/Папка/a b+c%20.pdf"
    assert names.result_json(key) == "output/Папка/a b+c%20.pdf.json"
    assert names.error_json(key) == "output/Папка/a b+c%20.pdf.error.json"
    # Leases carry the full source key: two deployments with other input prefixes never meet.
    assert names.lease(key) == ".watcher/leases/input/Папка/a b+c%20.pdf.lease"
    assert not names.is_document_key("input/folder/")
    assert not names.is_document_key("input/")
    assert names.is_document_key(key)
    # A name whose result fits the store's 255-byte segments but whose chunks would not:
    # refused only where chunks are written.
    long_key = "input/" + "a" * 240 + ".pdf"
    assert names.result_keys_fit(long_key)
    with_chunks = Names("input/", "output/", ".watcher/leases/", "done/", extras=(".chunks.jsonl",))
    assert not with_chunks.result_keys_fit(long_key)
    assert names.sources_of("output/x.pdf.chunks.jsonl") == ["input/x.pdf"]


def test_shards_are_stable_and_cover_every_key() -> None:
    keys = [f"input/{i}.pdf" for i in range(200)]
    shards = [shard_of(k, 3) for k in keys]
    assert set(shards) == {0, 1, 2}
    assert shards == [shard_of(k, 3) for k in keys]


def test_scrubber_masks_known_secrets_anywhere_and_secret_keys() -> None:
    scrub = SecretScrubber(["s3cr3t-value-xyz"])
    event = {"event": "x", "url": "http://h/?sig=s3cr3t-value-xyz", "api_key": "abc",
             "nested": {"list": ["s3cr3t-value-xyz"]}}
    out = scrub(None, "info", dict(event))
    assert out["url"] == f"http://h/?sig={REDACTED}"
    assert out["api_key"] == REDACTED and out["nested"]["list"] == [REDACTED]


def test_settings_defaults_and_overrides() -> None:
    settings = load_settings(**REQUIRED)
    assert settings.s3_region == "ru-central-1"
    assert settings.input_prefix == "input/" and settings.output_prefix == "output/"
    assert settings.http_port == 8081 and settings.poll_interval == 5
    assert settings.engine.value == "cpu"
    assert load_settings(**REQUIRED, output_prefix="results").output_prefix == "results/"
    with pytest.raises(SettingsError) as info:
        load_settings(**REQUIRED, shard_count=2, shard_index=2)
    assert "WATCHER_SHARD_INDEX" in str(info.value)


def test_pixel_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    buf = io.BytesIO()
    Image.new("1", (5000, 5000), 1).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    doc = open_document(path, path.stat().st_size, LIMITS)
    with pytest.raises(DocumentError) as info:
        doc.render(0)
    assert info.value.code is ErrorCode.PAGE_TOO_LARGE
    doc.close()


def test_credentials_can_come_from_a_mounted_secret_directory(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "CLOUDRU_S3_SECRET_KEY").write_text("from-a-mounted-file")
    env = {"PATH": "/usr/bin:/bin", "WATCHER_SECRETS_DIR": str(tmp_path),
           "CLOUDRU_S3_ENDPOINT": "http://127.0.0.1:9", "CLOUDRU_S3_BUCKET": "docs",
           "CLOUDRU_S3_ACCESS_KEY": "tenant:key"}
    code = "from watcher.core.settings import load_settings as l; print(l().s3_secret_key.get_secret_value())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "from-a-mounted-file", out.stderr


def test_vlm_engines_get_enough_pages_in_flight_to_fill_the_server() -> None:
    vlm = load_settings(**REQUIRED, engine="openai-vlm", vlm_max_concurrency=16)
    assert vlm.max_inflight_documents * vlm.page_concurrency >= 16
    explicit = load_settings(**REQUIRED, engine="openai-vlm", page_concurrency=1)
    assert explicit.page_concurrency == 1
    cpu = load_settings(**REQUIRED)
    assert (cpu.max_inflight_documents, cpu.page_concurrency) == (2, 2)


def test_download_dirs_of_dead_daemons_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    root = tmp_path / "watcher-work"
    dead = root / "999999999-0123abcd-1"  # no such pid: a daemon killed with SIGKILL
    dead.mkdir(parents=True)
    (dead / "watcher-x.pdf").write_bytes(b"%PDF half downloaded")
    neighbour = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = root / f"{neighbour.pid}-4567cdef-1"
        sibling = root / f"{os.getpid()}-{INCARNATION}-2"  # another daemon in this process
        sibling.mkdir()
        restarted = root / f"{os.getpid()}-previous-life-3"  # our pid, an earlier container
        live.mkdir()
        (live / "watcher-y.pdf").write_bytes(b"%PDF being read")
        restarted.mkdir()
        mine = prepare_work_dir(str(tmp_path))
    finally:
        neighbour.kill()
        neighbour.wait()
    assert not dead.exists()
    assert (live / "watcher-y.pdf").exists()  # another live daemon's download is left alone
    assert sibling.exists() and not restarted.exists()
    assert mine.parent == root and mine.name.startswith(f"{os.getpid()}-") and mine.is_dir()


# --- words of the configured languages (pipeline/words.py) -------------------------------------
def test_words_tell_a_russian_text_from_a_foreign_ocr_of_it_and_from_look_alikes() -> None:
    langs = words.languages("rus+eng")
    assert langs == ("ru", "en")
    text = "Поставщик обязуется передать товар в собственность покупателя в срок, а покупатель принять"
    right = words.score(text, langs)
    assert right.words == 9 and right.known == 1.0 and right.mixed == 0  # words of 3+ letters
    foreign = words.score(rudocs.foreign_ocr(text), langs)
    assert foreign.known < 0.3
    alike = words.score("".join(rudocs.LOOKALIKE.get(c, c) for c in text), langs)
    assert alike.mixed > 0.5 and alike.known < 0.3
    assert words.score("Invoice for the delivery of goods under the contract", langs).known == 1.0
    assert words.languages("chi_sim+jpn") == ()  # no word lists: layers are not judged by words


# --- structure: kinds, ids, heading paths, boxes that travel (pipeline/structure.py) -----------
def test_blocks_get_one_vocabulary_ids_and_heading_paths_across_pages() -> None:
    def blocks(*labels: tuple[str, str]) -> list[Block]:
        return [Block(label, [10.0 * n, 20.0, 10.0 * n + 50, 40.0], text)
                for n, (label, text) in enumerate(labels)]

    first = PageResult(index=0, width=200, height=100, markdown="", blocks=blocks(
        ("doc_title", "Договор поставки"), ("paragraph_title", "1. Предмет договора"),
        ("text", "Поставщик передаёт товар."), ("table", "<table/>")))
    second = PageResult(index=1, width=200, height=100, markdown="", blocks=blocks(
        ("header", "ООО «Север»"), ("text", "Покупатель оплачивает товар."),
        ("section_header_level_1", "2. Цена"), ("picture", ""), ("number", "2")))
    pages = structured_blocks([first, second])
    assert [b["id"] for b in pages[1]] == ["p2-b1", "p2-b2", "p2-b3", "p2-b4", "p2-b5"]
    assert [b["order"] for b in pages[1]] == [0, 1, 2, 3, 4]
    assert [(b["kind"], b.get("level")) for b in pages[0]] == [
        ("title", 1), ("heading", 2), ("paragraph", None), ("table", None)]
    assert [b["kind"] for b in pages[1]] == ["header", "paragraph", "heading", "figure", "page_number"]
    assert pages[1][0]["furniture"] and pages[1][4]["furniture"] and "furniture" not in pages[1][1]
    # The paragraph at the top of page 2 is still in section 1; section 2 replaces it.
    assert pages[0][0]["heading_path"] == []
    assert pages[0][1]["heading_path"] == ["Договор поставки"]
    assert pages[1][1]["heading_path"] == ["Договор поставки", "1. Предмет договора"]
    assert pages[1][2]["heading_path"] == ["Договор поставки"]
    assert pages[1][3]["heading_path"] == ["Договор поставки", "2. Цена"]
    assert pages[1][4]["heading_path"] == ["Договор поставки", "2. Цена"]
    assert pages[0][2]["bbox_norm"] == [0.1, 0.2, 0.35, 0.4]
    assert normalised([0, 0, 300, 50], 200, 100) == [0.0, 0.0, 1.0, 0.5]  # clamped to the page
    assert normalised([1, 2, 3, 4], 0, 0) == [0.0, 0.0, 0.0, 0.0]  # a page in error


# --- chunks (pipeline/chunks.py) -----------------------------------------------------------------
def test_chunks_keep_to_their_section_never_split_a_table_and_stay_within_size() -> None:
    def block(n: int, kind: str, text: str, **more: Any) -> dict[str, Any]:
        return {"id": f"p1-b{n}", "kind": kind, "text": text, "bbox_norm": [0, n / 10, 1, n / 10 + 0.05],
                **more}
    words = " ".join(f"слово{i}" for i in range(30))  # 30 tokens
    result = {"pages": [
        {"index": 0, "blocks": [
            block(1, "header", "ООО «Север»", furniture=True, heading_path=[]),
            block(2, "title", "Договор", level=1, heading_path=[]),
            block(3, "paragraph", words, heading_path=["Договор"]),
            block(4, "paragraph", words, heading_path=["Договор"]),
            block(5, "paragraph", words, heading_path=["Договор"]),
            block(6, "table", "Сторона Подпись " + words * 3, heading_path=["Договор"]),
            block(7, "heading", "1. Цена", level=2, heading_path=["Договор"]),
        ]},
        {"index": 1, "blocks": [
            {**block(1, "paragraph", "Цена 100 руб.", heading_path=["Договор", "1. Цена"]), "id": "p2-b1"},
            {**block(2, "page_number", "2", furniture=True, heading_path=[]), "id": "p2-b2"},
        ]},
    ]}
    chunks = chunks_of(result, max_tokens=64)
    assert [c["block_ids"] for c in chunks] == [["p1-b3", "p1-b4"], ["p1-b5"], ["p1-b6"], ["p2-b1"]]
    assert all(c["tokens"] <= 64 for c in chunks if "p1-b6" not in c["block_ids"])
    assert chunks[2]["tokens"] > 64  # a table is never split, whatever its size
    assert chunks[3]["heading_path"] == ["Договор", "1. Цена"] and chunks[3]["pages"] == [1]
    assert chunks[3]["contextualized_text"] == "Договор > 1. Цена\n\nЦена 100 руб."
    assert chunks[0]["boxes"] == [{"page": 0, "bbox_norm": [0, 3 / 10, 1, 3 / 10 + 0.05]},
                                  {"page": 0, "bbox_norm": [0, 4 / 10, 1, 4 / 10 + 0.05]}]
    assert [c["id"] for c in chunks] == ["c1", "c2", "c3", "c4"]
    assert all("ООО" not in c["text"] for c in chunks)  # furniture is in no chunk
    lines = to_jsonl(chunks).decode().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["c1", "c2", "c3", "c4"]


def test_a_docling_table_keeps_the_html_cells_and_their_spans() -> None:
    block = {"kind": "table", "text": "x", "bbox": [0, 0, 10, 10],
             "html": "<table><tr><th colspan=\"2\">Сторона</th></tr>"
                     "<tr><td rowspan=2>ООО</td><td>1 &amp; 2</td></tr><tr><td>3</td></tr></table>"}
    result = {"source": {"key": "input/a.pdf"}, "pages": [
        {"index": 0, "width": 100, "height": 100, "dpi": 72, "blocks": [block]}]}
    table = docling_document(result).tables[0].data
    assert (table.num_rows, table.num_cols) == (3, 2)
    cells = {(c.start_row_offset_idx, c.start_col_offset_idx): c for c in table.table_cells}
    assert cells[(0, 0)].col_span == 2 and cells[(0, 0)].column_header
    assert cells[(1, 0)].row_span == 2 and cells[(1, 1)].text == "1 & 2" and cells[(2, 1)].text == "3"


def test_the_docling_output_needs_docling_core(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "docling_core" else real(name, *a))
    with pytest.raises(SettingsError, match="docling"):
        load_settings(s3_endpoint="http://x.invalid", s3_bucket="b", s3_access_key="a",
                      s3_secret_key="s", outputs="docling")


def test_the_published_schema_is_the_version_results_carry() -> None:
    from watcher.pipeline.result import SCHEMA_VERSION

    schema = json.loads((Path(__file__).parent.parent / "watcher/schema/result-v2.json").read_text())
    assert schema["$id"] == "watcher.result/2" and SCHEMA_VERSION.startswith("2.")
    assert re.fullmatch(schema["properties"]["schema_version"]["pattern"], SCHEMA_VERSION)

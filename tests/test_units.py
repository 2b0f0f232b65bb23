"""Small pieces on their own: format sniffing, reading order, names, redaction, settings."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import rudocs
from docgen import make_image, make_pdf, make_tiff
from PIL import Image

from watcher.bucket.names import Names, shard_of
from watcher.core.errors import DocumentError, ErrorCode
from watcher.core.identity import INCARNATION
from watcher.core.logs import REDACTED, SecretScrubber
from watcher.core.pages import Block
from watcher.core.settings import SettingsError, load_settings
from watcher.engines.cpu import paragraphs_to_markdown
from watcher.pipeline import words
from watcher.pipeline.decode import Format, Limits, open_document, sniff
from watcher.pipeline.fetch import prepare_work_dir

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

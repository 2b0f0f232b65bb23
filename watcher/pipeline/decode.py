"""Decode pages: recognise the format by content, enforce limits, render pages on demand.

PDFium is not thread-safe, so every call into a document runs on the one decode thread
owned by `Decoder`; the event loop only awaits it. Pages are rendered one at a time when
the engine asks for them, so a 500-page PDF never sits in memory as 500 bitmaps. The
daemon runs all of this in decode worker processes (pipeline/decode_workers.py), never in
its own; `Decoder` in-process serves tools and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image, ImageFile, ImageStat, UnidentifiedImageError

from watcher.core.errors import DocumentError, ErrorCode, scrub
from watcher.core.pages import RenderedPage
from watcher.pipeline import repair

if TYPE_CHECKING:
    from watcher.pipeline.textlayer import TextLayer

# Our own pixel limit is the guard; Pillow's warning-or-error heuristic would fire first
# with a less helpful message.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class Format(StrEnum):
    PDF = "pdf"
    PNG = "png"
    JPEG = "jpeg"
    TIFF = "tiff"
    BMP = "bmp"
    WEBP = "webp"


SUPPORTED = "PDF, PNG, JPEG, TIFF, BMP, WebP"
_PIL_FORMATS = {Format.PNG: "PNG", Format.JPEG: "JPEG", Format.TIFF: "TIFF",
                Format.BMP: "BMP", Format.WEBP: "WEBP"}


def sniff(head: bytes) -> Format | None:
    """The format from the first bytes of the file, regardless of its name."""
    if head.startswith(b"%PDF-") or b"%PDF-" in head[:1024]:
        return Format.PDF
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Format.PNG
    if head.startswith(b"\xff\xd8\xff"):
        return Format.JPEG
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return Format.TIFF
    if head.startswith(b"BM") and len(head) >= 26:
        return Format.BMP
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Format.WEBP
    return None


@dataclass(frozen=True)
class Limits:
    max_pages: int
    max_page_pixels: int
    render_dpi: int


# The PDF specification's page size limits (ISO 32000-1, annex C), in points: PDFium
# opens pages outside them, and a page 2^31 points tall crashes whatever reads it.
MIN_PAGE_POINTS = 3.0
MAX_PAGE_POINTS = 14_400.0
# Below this a page squeezed into WATCHER_MAX_PAGE_PIXELS loses its small print.
LEGIBLE_DPI = 100


class Document:
    """An opened document; all methods must run on the decode thread."""

    format: Format
    page_count: int
    # What the document as a whole warns of (a PDF read from a repaired copy).
    warnings: Sequence[dict[str, str]] = ()

    def render(self, index: int) -> RenderedPage:
        raise NotImplementedError

    def text_layer(self, index: int) -> TextLayer | None:
        """The page's own text, where the format has one (PDF)."""
        return None

    def close(self) -> None:
        raise NotImplementedError


def _load_pdf(path: Path) -> pdfium.PdfDocument:
    # pypdfium2's own opener reads PDFium's last error also when loading succeeded but
    # found no pages, and that error is whatever the previous document left behind (a
    # readable PDF after an encrypted one was "encrypted"). Load, then ask, ourselves.
    raw = pdfium_c.FPDF_LoadDocument((str(path) + "\x00").encode("utf-8"), None)
    if not raw:
        code = pdfium_c.FPDF_GetLastError()
        if code == pdfium_c.FPDF_ERR_PASSWORD:
            raise DocumentError(
                ErrorCode.ENCRYPTED, "the PDF is password-protected; upload it without a password"
            )
        if code == pdfium_c.FPDF_ERR_SECURITY:
            raise DocumentError(
                ErrorCode.ENCRYPTED,
                "the PDF is encrypted with a security handler PDFium does not support; "
                "upload it without encryption",
            )
        reason = _PDFIUM_LOAD_ERRORS.get(code, "it is not a readable PDF")
        raise DocumentError(ErrorCode.CORRUPT, f"the PDF cannot be opened: {reason}")
    pdf = pdfium.PdfDocument(raw)
    if len(pdf) < 1:
        pdf.close()
        raise DocumentError(
            ErrorCode.CORRUPT,
            "the PDF opens but PDFium finds no pages in it (its page tree is missing or damaged)",
        )
    return pdf


_PDFIUM_LOAD_ERRORS = {
    pdfium_c.FPDF_ERR_FILE: "the file cannot be read",
    pdfium_c.FPDF_ERR_FORMAT: "its structure is damaged or it is not a PDF",
}


def _load_repaired(path: Path, damage: DocumentError) -> tuple[pdfium.PdfDocument, str]:
    """A PDF PDFium could not read, loaded from a repaired copy (pipeline/repair.py), and
    how it was repaired; `damage` again when no repair helps."""
    for fix, how in ((repair.with_qpdf, "rewritten by qpdf"),
                     (repair.with_new_catalog, "given a new catalog over its pages")):
        fixed = fix(path)
        if fixed is None:
            continue
        try:
            pdf = _load_pdf(fixed)
        except DocumentError:
            continue
        finally:
            # PDFium keeps the file open: the copy's space is freed when the document closes.
            fixed.unlink(missing_ok=True)
        return pdf, how
    raise damage


class PdfDocument(Document):
    def __init__(self, path: Path, limits: Limits) -> None:
        self.format = Format.PDF
        self.limits = limits
        try:
            self.pdf = _load_pdf(path)
        except DocumentError as damage:
            if damage.code is not ErrorCode.CORRUPT:
                raise
            self.pdf, how = _load_repaired(path, damage)
            self.warnings = [{
                "code": "repaired",
                "message": f"{damage.message}; it was {how} and read from the repaired copy, "
                "which may differ from what other readers show",
            }]
        self.page_count = len(self.pdf)

    def _page(self, index: int) -> pdfium.PdfPage:
        try:
            return self.pdf[index]
        except pdfium.PdfiumError:
            raise DocumentError(ErrorCode.CORRUPT, f"page {index + 1} cannot be loaded") from None

    def _frame(self, page: pdfium.PdfPage, index: int) -> tuple[float, int, int, list[dict[str, str]]]:
        """Scale and pixel size of the page as rendered, and what to warn about it."""
        width_pt, height_pt = page.get_size()
        box = [ctypes.c_float() for _ in range(4)]
        if pdfium_c.FPDFPage_GetMediaBox(page, *(ctypes.byref(v) for v in box)):
            # PDFium shows a page whose MediaBox has no area as US Letter; it is broken.
            left, bottom, right, top = (v.value for v in box)
            if abs(right - left) < MIN_PAGE_POINTS or abs(top - bottom) < MIN_PAGE_POINTS:
                raise DocumentError(
                    ErrorCode.BAD_PAGE_GEOMETRY,
                    f"page {index + 1} has a MediaBox without area "
                    f"[{left:g} {bottom:g} {right:g} {top:g}]",
                )
        for side in (width_pt, height_pt):
            if not math.isfinite(side) or not MIN_PAGE_POINTS <= side <= MAX_PAGE_POINTS:
                raise DocumentError(
                    ErrorCode.BAD_PAGE_GEOMETRY,
                    f"page {index + 1} is {width_pt:.6g} x {height_pt:.6g} pt, outside the "
                    f"{MIN_PAGE_POINTS:g}-{MAX_PAGE_POINTS:g} pt a PDF page may have",
                )
        scale = self.limits.render_dpi / 72.0
        pixels = width_pt * height_pt * scale * scale
        warnings: list[dict[str, str]] = []
        if pixels > self.limits.max_page_pixels:
            # A poster-sized page still gets read: render it smaller rather than refuse.
            # PDFium rounds each side up, so stay a hair under the limit.
            scale *= math.sqrt(self.limits.max_page_pixels / pixels) * 0.999
            if scale * 72 < LEGIBLE_DPI:
                warnings.append({
                    "code": "low_resolution",
                    "message": f"page {index + 1} ({width_pt / 72:.0f} x {height_pt / 72:.0f} in) "
                    f"was read at {scale * 72:.0f} dpi to stay within WATCHER_MAX_PAGE_PIXELS; "
                    "small print may be lost",
                })
        return scale, math.ceil(width_pt * scale), math.ceil(height_pt * scale), warnings

    def render(self, index: int) -> RenderedPage:
        page = self._page(index)
        try:
            scale, _, _, warnings = self._frame(page, index)
            bitmap = page.render(scale=scale)
            image = bitmap.to_pil().convert("RGB")
            bitmap.close()
        finally:
            page.close()
        return RenderedPage(index, image, image.width, image.height, warnings, dpi=round(scale * 72, 2))

    def text_layer(self, index: int) -> TextLayer | None:
        from watcher.pipeline.textlayer import read_text_layer  # it builds on the engine's types

        page = self._page(index)
        try:
            scale, width, height, _ = self._frame(page, index)
            layer = read_text_layer(page, index, width, height)
            layer.result.dpi = round(scale * 72, 2)
            return layer
        finally:
            page.close()

    def close(self) -> None:
        self.pdf.close()


class ImageDocument(Document):
    def __init__(self, path: Path, fmt: Format, limits: Limits) -> None:
        self.format = fmt
        self.limits = limits
        try:
            self.image = Image.open(path, formats=[_PIL_FORMATS[fmt]])
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DocumentError(
                ErrorCode.CORRUPT, f"the {fmt.value.upper()} image cannot be read: {exc}"
            ) from None
        # Only TIFF pages are pages; an animated WebP is one picture, not a document.
        self.page_count = getattr(self.image, "n_frames", 1) if fmt is Format.TIFF else 1

    def render(self, index: int) -> RenderedPage:
        try:
            self.image.seek(index)
            width, height = self.image.size
            if width * height > self.limits.max_page_pixels:
                raise DocumentError(
                    ErrorCode.PAGE_TOO_LARGE,
                    f"page {index + 1} is {width}x{height} pixels, over the limit of "
                    f"{self.limits.max_page_pixels} (WATCHER_MAX_PAGE_PIXELS)",
                )
            if width < 1 or height < 1:
                raise DocumentError(ErrorCode.BAD_PAGE_GEOMETRY, f"page {index + 1} has no pixels")
            with warnings.catch_warnings(record=True) as caught, native_stderr() as said:
                warnings.simplefilter("always")
                image = _to_rgb(self.image)
        except DocumentError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            detail = "; ".join(said) or str(exc)
            raise DocumentError(
                ErrorCode.CORRUPT, f"page {index + 1} of the image cannot be decoded: {detail}"
            ) from None
        reported = [{"code": "decoder_warning", "message": f"page {index + 1}: {scrub(message)}"}
                    for message in [*(str(w.message) for w in caught), *said]]
        return RenderedPage(index, image, image.width, image.height, reported, dpi=_image_dpi(self.image))

    def close(self) -> None:
        self.image.close()


@contextlib.contextmanager
def native_stderr() -> Iterator[list[str]]:
    """What native decoders print to stderr meanwhile (libtiff's "Bad code word" is the
    only sign of a damaged fax-compressed strip), as lines; echoed to stderr as well.

    Only the decode thread writes images, so the window is short; anything another
    thread writes to stderr in it is echoed too, not lost."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            said = sink.read().decode("utf-8", "replace")
            if said:
                os.write(2, said.encode("utf-8"))
            # libtiff starts with the file or function name: keep only the message.
            lines.extend(line.split(": ", 1)[-1] for line in said.splitlines() if line.strip())


def _image_dpi(image: Image.Image) -> float | None:
    """The resolution an image file says it has (JPEG, PNG, TIFF), if it says one."""
    dpi: Any = image.info.get("dpi")
    try:
        value = float(dpi[0] if isinstance(dpi, tuple) else dpi)
    except (TypeError, ValueError, IndexError):
        return None
    return round(value, 2) if math.isfinite(value) and value > 1 else None


def _to_rgb(image: Image.Image) -> Image.Image:
    image.load()
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return _flatten(image.convert("RGBA"))
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return image.point(lambda v: v / 256).convert("RGB")
    return image.convert("RGB")


def _flatten(rgba: Image.Image) -> Image.Image:
    """Transparency onto a background the drawn pixels stand out from: white under dark
    content, black under light content (white text on a transparent PNG stays readable)."""
    alpha = rgba.getchannel("A")
    drawn = ImageStat.Stat(rgba.convert("L"), mask=alpha.point(lambda a: 255 if a else 0))
    light = bool(drawn.count[0]) and drawn.mean[0] > 160
    flat = Image.new("RGB", rgba.size, "black" if light else "white")
    flat.paste(rgba, mask=alpha)
    return flat


# What common files that are not documents start with, to name them in the error record.
_NOT_DOCUMENTS = (
    (b"PK\x03\x04", "a ZIP archive (Word, Excel and OpenDocument files are ZIP archives)"),
    (b"\xd0\xcf\x11\xe0", "an old Microsoft Office file (.doc, .xls)"),
    (b"{\\rtf", "an RTF text document"),
    (b"GIF8", "a GIF image"),
    (b"%!PS", "a PostScript file"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"Rar!", "a RAR archive"),
    (b"7z\xbc\xaf", "a 7-Zip archive"),
)
_DOCUMENT_SUFFIXES = {".pdf", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}


def not_a_document(head: bytes, suffix: str) -> str:
    """Why content no reader takes is refused, naming what it looks like where it can."""
    kind = next((name for magic, name in _NOT_DOCUMENTS if head.startswith(magic)), None)
    if kind is None and head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1"):
        kind = "a HEIC photo (export it as JPEG)"
    if kind is None and _is_text(head):
        html = head.lstrip().lower().startswith((b"<!doctype html", b"<html"))
        kind = "an HTML page" if html else "text"
    if suffix.lower() in _DOCUMENT_SUFFIXES:
        claimed = f"; its name ends in '{suffix}' but its bytes are not a {suffix} file"
    else:
        claimed = f"; '{suffix}' files are not among them" if suffix else ""
    what = f"the content is {kind}, not" if kind else "the content is not"
    return (f"{what} a document the watcher reads ({SUPPORTED}){claimed}; "
            "convert it to PDF or an image and upload that")


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # Cut in the middle of a character at the end of the sample, or not UTF-8 at all.
        text = head[:-4].decode("utf-8", "replace") if len(head) > 4 else ""
        if text.count("\ufffd") > 0:
            return False
    return bool(text) and all(c.isprintable() or c in "\r\n\t\f" for c in text)


def open_document(path: Path, size: int, limits: Limits, key: str = "") -> Document:
    """Open `path` (already downloaded) as a document; raise DocumentError when bad."""
    if size == 0:
        raise DocumentError(ErrorCode.EMPTY, "the object is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(2048)
    fmt = sniff(head)
    if fmt is None:
        raise DocumentError(ErrorCode.UNSUPPORTED_FORMAT, not_a_document(head, Path(key).suffix))
    doc: Document = PdfDocument(path, limits) if fmt is Format.PDF else ImageDocument(
        path, fmt, limits
    )
    if doc.page_count == 0:
        doc.close()
        raise DocumentError(ErrorCode.EMPTY, "the document has no pages")
    if doc.page_count > limits.max_pages:
        count = doc.page_count
        doc.close()
        raise DocumentError(
            ErrorCode.TOO_MANY_PAGES,
            f"the document has {count} pages, over the limit of {limits.max_pages} "
            "(WATCHER_MAX_PAGES)",
        )
    return doc


# PDFium keeps global state and is not thread-safe: every call in the process, whichever
# Decoder makes it (tests and the demo run several daemons in one process), goes through
# this one thread.
_DECODE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")


class Decoder:
    """Runs all decoding on the process's one decode thread, off the event loop."""

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(_DECODE_THREAD, fn, *args)

    async def open(self, path: Path, size: int, limits: Limits, key: str) -> Document:
        doc: Document = await self._run(open_document, path, size, limits, key)
        return doc

    async def render(self, doc: Document, index: int) -> RenderedPage:
        page: RenderedPage = await self._run(doc.render, index)
        return page

    async def text_layer(self, doc: Document, index: int) -> TextLayer | None:
        layer: TextLayer | None = await self._run(doc.text_layer, index)
        return layer

    async def close(self, doc: Document) -> None:
        await self._run(doc.close)


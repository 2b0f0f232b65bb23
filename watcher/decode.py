"""Decode pages: recognise the format by content, enforce limits, render pages on demand.

PDFium is not thread-safe, so every call into a document runs on the one decode thread
owned by `Decoder`; the event loop only awaits it. Pages are rendered one at a time when
the engine asks for them, so a 500-page PDF never sits in memory as 500 bitmaps.
"""

from __future__ import annotations

import asyncio
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pypdfium2 as pdfium
from PIL import Image, ImageFile, UnidentifiedImageError

from watcher.errors import DocumentError, ErrorCode

# Our own pixel limit is the guard; Pillow's warning-or-error heuristic would fire first
# with a less helpful message.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

_PDFIUM_PASSWORD_ERROR = 4


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


@dataclass
class RenderedPage:
    index: int
    image: Image.Image  # RGB
    width: int
    height: int


class Document:
    """An opened document; all methods must run on the decode thread."""

    format: Format
    page_count: int

    def render(self, index: int) -> RenderedPage:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class PdfDocument(Document):
    def __init__(self, path: Path, limits: Limits) -> None:
        self.format = Format.PDF
        self.limits = limits
        try:
            self.pdf = pdfium.PdfDocument(str(path))
        except pdfium.PdfiumError as exc:
            if getattr(exc, "err_code", None) == _PDFIUM_PASSWORD_ERROR:
                raise DocumentError(
                    ErrorCode.ENCRYPTED, "the PDF is password-protected; upload it without a password"
                ) from None
            raise DocumentError(ErrorCode.CORRUPT, f"the PDF cannot be opened: {exc}") from None
        self.page_count = len(self.pdf)

    def render(self, index: int) -> RenderedPage:
        try:
            page = self.pdf[index]
        except pdfium.PdfiumError as exc:
            raise DocumentError(ErrorCode.CORRUPT, f"page {index + 1} cannot be read: {exc}") from None
        try:
            width_pt, height_pt = page.get_size()
            scale = self.limits.render_dpi / 72.0
            pixels = width_pt * height_pt * scale * scale
            if pixels > self.limits.max_page_pixels:
                # A poster-sized page still gets read: render it smaller rather than refuse.
                # PDFium rounds each side up, so stay a hair under the limit.
                scale *= math.sqrt(self.limits.max_page_pixels / pixels) * 0.999
            if width_pt * scale < 1 or height_pt * scale < 1:
                raise DocumentError(ErrorCode.CORRUPT, f"page {index + 1} has no area")
            bitmap = page.render(scale=scale)
            image = bitmap.to_pil().convert("RGB")
            bitmap.close()
        finally:
            page.close()
        return RenderedPage(index, image, image.width, image.height)

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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = _to_rgb(self.image)
        except DocumentError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise DocumentError(
                ErrorCode.CORRUPT, f"page {index + 1} of the image cannot be decoded: {exc}"
            ) from None
        return RenderedPage(index, image, image.width, image.height)

    def close(self) -> None:
        self.image.close()


def _to_rgb(image: Image.Image) -> Image.Image:
    image.load()
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, "white")
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return image.point(lambda v: v / 256).convert("RGB")
    return image.convert("RGB")


def open_document(path: Path, size: int, limits: Limits, key: str = "") -> Document:
    """Open `path` (already downloaded) as a document; raise DocumentError when bad."""
    if size == 0:
        raise DocumentError(ErrorCode.EMPTY, "the object is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(2048)
    fmt = sniff(head)
    if fmt is None:
        suffix = Path(key).suffix
        named = f" although its name ends in '{suffix}'" if suffix else ""
        raise DocumentError(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"the content is not a supported document type ({SUPPORTED}){named}",
        )
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


class Decoder:
    """Runs all decoding on one dedicated thread, off the event loop."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self, path: Path, size: int, limits: Limits, key: str) -> Document:
        doc: Document = await self._run(open_document, path, size, limits, key)
        return doc

    async def render(self, doc: Document, index: int) -> RenderedPage:
        page: RenderedPage = await self._run(doc.render, index)
        return page

    async def close(self, doc: Document) -> None:
        await self._run(doc.close)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

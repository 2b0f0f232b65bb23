"""Documents with known text, generated for tests, the benchmark and the shipped samples."""

from __future__ import annotations

import io
from collections.abc import Sequence

from fpdf import FPDF
from PIL import Image, ImageDraw, ImageFont


def make_pdf(pages: Sequence[Sequence[str]], password: str | None = None) -> bytes:
    """An A4 PDF with real text objects, one list of lines per page."""
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(False)
    for lines in pages:
        pdf.add_page()
        pdf.set_font("Helvetica", size=20)
        for i, line in enumerate(lines):
            pdf.text(20, 30 + i * 14, line)
    if password is not None:
        pdf.set_encryption(owner_password=password + "-owner", user_password=password)
    return bytes(pdf.output())


def page_image(lines: Sequence[str], size: tuple[int, int] = (1000, 700)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    # DejaVu (Debian's fonts-dejavu-core) has Cyrillic; Pillow finds it in the system fonts.
    font = ImageFont.truetype("DejaVuSans.ttf", 34)
    for i, line in enumerate(lines):
        draw.text((50, 50 + i * 70), line, fill="black", font=font)
    return image


def make_image(lines: Sequence[str], fmt: str, size: tuple[int, int] = (1000, 700)) -> bytes:
    buf = io.BytesIO()
    page_image(lines, size).save(buf, format=fmt)
    return buf.getvalue()


def make_tiff(pages: Sequence[Sequence[str]]) -> bytes:
    images = [page_image(lines) for lines in pages]
    buf = io.BytesIO()
    images[0].save(buf, format="TIFF", save_all=True, append_images=images[1:],
                   compression="tiff_deflate")
    return buf.getvalue()


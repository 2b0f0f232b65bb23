"""Documents with known text, generated for tests, the benchmark and the shipped samples."""

from __future__ import annotations

import io
import zlib
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


def pdf_bomb(operators: int) -> bytes:
    """A one-page PDF whose few hundred kilobytes of content stream inflate to `operators`
    path operators (14 bytes each): 20 million make PDFium want gigabytes to load the
    page, and abort when it cannot have them."""
    compressor = zlib.compressobj(9)
    chunk = b"0 0 m 1 1 l S\n" * 100_000
    data = b"".join(compressor.compress(chunk) for _ in range(operators // 100_000)) + compressor.flush()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)

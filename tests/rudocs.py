"""Russian documents with known text, for tests and the Russian OCR quality benchmark.

Every generator documents its ground truth: the text an ideal reader should return. Born-digital
PDFs embed a DejaVu TrueType font (Debian package fonts-dejavu-core), so Cyrillic renders the same
everywhere. The damaged documents are made by byte surgery on fpdf2 output, or written by hand, and
`python tests/rudocs.py` checks that each is damaged the way its docstring says.
"""

from __future__ import annotations

import io
import math
import os
import random
import re
import struct
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pypdfium2 as pdfium
from fpdf import FPDF
from PIL import Image, ImageDraw, ImageFile, ImageFilter, ImageFont
from rapidfuzz.distance import Levenshtein

FONT_DIR = Path("/usr/share/fonts")
FONT_PACKAGE = "fonts-dejavu-core"

RUSSIAN_TEXT: list[list[str]] = [
    [
        "ДОГОВОР ПОСТАВКИ № 45/2024-П",
        "г. Москва, «15» марта 2024 г.",
        "ООО «Северный ветер», именуемое в дальнейшем «Поставщик»,",
        "в лице генерального директора Иванова Петра Сергеевича,",
        "действующего на основании Устава, с одной стороны, и",
        "АО «Техномаш», именуемое в дальнейшем «Покупатель», в лице",
        "финансового директора Смирновой Анны Викторовны, с другой",
        "стороны, заключили настоящий договор о нижеследующем.",
        "1. ПРЕДМЕТ ДОГОВОРА",
        "1.1. Поставщик обязуется передать Покупателю товар согласно",
        "спецификации (Приложение № 1), а Покупатель — принять и оплатить.",
        "1.2. Качество товара должно соответствовать ГОСТ Р 52931-2008",
        "и требованиям системы менеджмента качества ISO 9001:2015.",
        "2. ЦЕНА И ПОРЯДОК РАСЧЁТОВ",
        "2.1. Общая стоимость товара составляет 1 245 780,50 руб.,",
        "в том числе НДС 20% — 207 630,08 руб.",
        "2.2. Оплата производится в течение 10 (десяти) банковских дней",
        "с даты подписания товарной накладной по форме ТОРГ-12.",
        "2.3. Счёт и акт направляются в формате PDF по электронной почте.",
        "3. ОТВЕТСТВЕННОСТЬ СТОРОН",
        "3.1. За просрочку оплаты Покупатель уплачивает пеню в размере",
        "0,1% от неоплаченной суммы за каждый день просрочки.",
        "3.2. Споры разрешаются в Арбитражном суде г. Москвы.",
    ],
    [
        "ГОСТ Р 7.0.97-2016",
        "НАЦИОНАЛЬНЫЙ СТАНДАРТ РОССИЙСКОЙ ФЕДЕРАЦИИ",
        "Система стандартов по информации, библиотечному и",
        "издательскому делу. Организационно-распорядительная",
        "документация. Требования к оформлению документов",
        "Дата введения — 2018-07-01",
        "1 Область применения",
        "Настоящий стандарт распространяется на следующие",
        "организационно-распорядительные документы: уставы, положения,",
        "правила, инструкции, регламенты, распоряжения, приказы.",
        "2 Нормативные ссылки",
        "В настоящем стандарте использованы ссылки на стандарты:",
        "ГОСТ Р ИСО 15489-1-2019 Управление документами",
        "ГОСТ 6.10.1-88 Унифицированные системы документации",
        "3 Термины и определения",
        "3.1 реквизит документа: элемент оформления документа.",
        "3.2 бланк документа: набор реквизитов, идентифицирующих автора.",
        "4 Общие требования к созданию документов",
        "4.1 Документы создаются на бумажном носителе и в электронной",
        "форме с соблюдением установленных форматов (PDF/A-1, XML).",
        "4.2 Для изготовления документов используют бланки форматов",
        "А4 (210 × 297 мм) и А5 (148 × 210 мм).",
    ],
    [
        "Приложение № 1 к приказу ФНС России от 29.10.2014 № ММВ-7-3/558@",
        "НАЛОГОВАЯ ДЕКЛАРАЦИЯ ПО НАЛОГУ НА ДОБАВЛЕННУЮ СТОИМОСТЬ",
        "Форма по КНД 1151001",
        "ИНН 7701234560 КПП 770101001",
        "Номер корректировки: 0 Налоговый период (код): 21",
        "Отчётный год: 2024 Представляется в налоговый орган (код): 7736",
        "ОБЩЕСТВО С ОГРАНИЧЕННОЙ ОТВЕТСТВЕННОСТЬЮ «ВЕКТОР-М»",
        "ОГРН 1237700456789 Код по ОКТМО 45382000",
        "Номер контактного телефона: +7 (495) 123-45-67",
        "Раздел 1. Сумма налога, подлежащая уплате в бюджет",
        "Код строки 010 — ОКТМО 45382000",
        "Код строки 020 — КБК 18210301000011000110",
        "Код строки 030 — сумма налога к уплате: 184 350 руб.",
        "Код строки 040 — сумма налога к уменьшению: 0 руб.",
        "Достоверность и полноту сведений подтверждаю:",
        "1 — налогоплательщик; Ёлкин Фёдор Юрьевич",
        "Подпись, дата: 25.04.2024",
        "Документ представлен на 12 страницах с приложением копий",
        "подтверждающих документов на 3 листах.",
    ],
]
"""Three A4 pages: a supply contract, a ГОСТ-style standard, a VAT return. No line ends with a
hyphen: PDFium's text layer turns a line-final "-" into U+FFFE and joins it to the next line."""

MIXED_TEXT: list[list[str]] = [
    [
        "Invoice № INV-2024-0317 / Счёт-фактура № 317",
        "Supplier / Поставщик: ООО «Вектор-М», ИНН 7701234560",
        "Buyer / Покупатель: Northwind Trading GmbH, VAT DE123456789",
        "Item / Наименование: Server rack 42U / Серверная стойка",
        "Quantity / Количество: 3 pcs / шт.",
        "Unit price / Цена за единицу: 1 250,00 EUR",
        "Total / Итого: 3 750,00 EUR",
        "Payment terms: 30 days net / Оплата в течение 30 дней",
        "The document is signed with a qualified electronic signature.",
        "Документ подписан квалифицированной электронной подписью.",
        "Certificate SHA-256: 3F9A 0C41 77B2 E8D5",
        "Contact: support@vector-m.ru, tel. +7 (495) 123-45-67",
    ],
]
"""One page of bilingual (Russian/English) invoice lines."""

# Short lines whose every character is Cyrillic (or a space): PDFium's substitute font draws
# nothing for them when the real font is not embedded (see pdf_nonembedded_font).
CYRILLIC_ONLY: list[str] = [
    "Решение общего собрания участников",
    "Утвердить годовой отчёт и бухгалтерский баланс",
    "Избрать ревизионную комиссию в составе трёх человек",
]

_A4_MM = (210.0, 297.0)
_MM = 72 / 25.4  # points per millimetre
_LEFT_MM = 20.0
_TOP_MM = 20.0


# -- fonts ----------------------------------------------------------------------------------------

def font_path(name: str) -> Path:
    """The first TTF called `name` (e.g. "DejaVuSans.ttf") under /usr/share/fonts."""
    direct = FONT_DIR / "truetype" / "dejavu" / name
    if direct.is_file():
        return direct
    found = sorted(FONT_DIR.rglob(name)) if FONT_DIR.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"font {name!r} is not under {FONT_DIR}; install the Debian package {FONT_PACKAGE} "
            f"(apt-get install {FONT_PACKAGE})"
        )
    return found[0]


def _pil_font(size: int, name: str = "DejaVuSans.ttf") -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(name)), size)


# -- born-digital PDFs --------------------------------------------------------------------------

def _fpdf(font: str, size: float) -> FPDF:
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(False)
    pdf.add_font("Body", fname=str(font_path(font)))
    pdf.set_font("Body", size=size)
    return pdf


def _write_lines(pdf: FPDF, lines: Sequence[str], size: float, top_mm: float = _TOP_MM) -> None:
    step = size * 1.5 / _MM  # 1.5 line spacing, in mm
    right = _A4_MM[0] - _LEFT_MM / 2
    for i, line in enumerate(lines):
        y = top_mm + size / _MM + i * step
        if y > _A4_MM[1] - 10:
            raise ValueError(f"{len(lines)} lines at {size} pt do not fit on an A4 page")
        if _LEFT_MM + pdf.get_string_width(line) > right:
            raise ValueError(f"line {line!r} is too wide for an A4 page at {size} pt")
        pdf.text(_LEFT_MM, y, line)


def ru_pdf(pages: Sequence[Sequence[str]], font: str = "DejaVuSans.ttf", size: float = 12,
           password: str | None = None) -> bytes:
    """A4 born-digital PDF, one list of lines per page, `font` embedded (subset) from DejaVu.

    Ground truth: `pages`, line by line; pypdfium2's text layer returns each page's lines joined
    by "\\r\\n". With `password`, RC4-encrypted: user password `password`, owner `password+"-owner"`
    (fpdf2's RC4 handler takes Latin-1 passwords only).
    Raises ValueError if a line would run off the page.
    """
    pdf = _fpdf(font, size)
    for lines in pages:
        pdf.add_page()
        _write_lines(pdf, lines, size)
    if password is not None:
        pdf.set_encryption(owner_password=password + "-owner", user_password=password)
    return bytes(pdf.output())


def render_pages(pdf: bytes, dpi: int = 200, password: str | None = None) -> list[Image.Image]:
    """Every page rendered by PDFium at `dpi`, as RGB images."""
    doc = pdfium.PdfDocument(pdf, password=password)
    try:
        return [doc[i].render(scale=dpi / 72).to_pil().convert("RGB") for i in range(len(doc))]
    finally:
        doc.close()


def pdf_text(pdf: bytes, password: str | None = None) -> list[str]:
    """The text layer of every page as pypdfium2 returns it (lines joined by "\\r\\n")."""
    doc = pdfium.PdfDocument(pdf, password=password)
    try:
        return [doc[i].get_textpage().get_text_range() for i in range(len(doc))]
    finally:
        doc.close()


def normalise(text: str | Sequence[str]) -> str:
    """Whitespace collapsed to single spaces: what ground truth and extracted text compare as."""
    joined = text if isinstance(text, str) else "\n".join(text)
    return " ".join(joined.split())


def similarity(truth: str | Sequence[str], got: str) -> float:
    """1 - normalised Levenshtein distance, whitespace collapsed: character accuracy."""
    return float(Levenshtein.normalized_similarity(normalise(truth), normalise(got)))


def ink_fraction(image: Image.Image, threshold: int = 200) -> float:
    """The fraction of pixels darker than `threshold` (0: a blank white page)."""
    return float((np.asarray(image.convert("L")) < threshold).mean())


# -- scans ----------------------------------------------------------------------------------------

def degrade(image: Image.Image, seed: int) -> Image.Image:
    """A scan-like copy of `image`, mode "L", the same size; deterministic for a `seed`.

    Grayscale, skew of up to ±0.7° (white fill), gaussian blur (radius 0.5-0.9 px), contrast
    squeezed into about [35, 230], gaussian noise (sigma 6-10), then a JPEG round trip at quality 55.
    """
    rng = random.Random(seed)
    gray = image.convert("L")
    angle = rng.uniform(-0.7, 0.7)
    gray = gray.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=255)
    gray = gray.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 0.9)))
    low, high = rng.uniform(25, 45), rng.uniform(220, 240)
    pixels = np.asarray(gray, dtype=np.float32) / 255.0 * (high - low) + low
    noise = np.random.default_rng(seed).normal(0.0, rng.uniform(6, 10), pixels.shape)
    noisy = Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8), "L")
    buf = io.BytesIO()
    noisy.save(buf, format="JPEG", quality=55)
    buf.seek(0)
    with Image.open(buf) as jpeg:
        return jpeg.convert("L")


def image_bytes(image: Image.Image, fmt: str, **save: object) -> bytes:
    """`image` encoded as `fmt` ("PNG", "JPEG", "TIFF", "WEBP", "BMP", ...)."""
    if fmt.upper() in ("JPEG", "JPG") and image.mode not in ("L", "RGB", "CMYK"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def scan_pdf(images: Sequence[Image.Image], dpi: int = 200, jpeg_quality: int | None = 75) -> bytes:
    """An image-only PDF (no text layer, no fonts): one image per page, the page `dpi`-sized, so
    rendering it at `dpi` gives the images back at their own size. Images go in as JPEG at
    `jpeg_quality`, or losslessly (Flate) when it is None. Ground truth: whatever the images show."""
    pdf = FPDF(unit="pt")
    pdf.set_auto_page_break(False)
    for image in images:
        # 0.01-0.02 pt under the exact size (fpdf2 writes 2 decimals): PDFium's float32 page size
        # times dpi/72 must not land a hair above the pixel count, or the render gains a column.
        w, h = ((math.floor(px * 72 / dpi * 100) - 1) / 100 for px in image.size)
        pdf.add_page(format=(w, h))
        if jpeg_quality is None:
            pdf.image(image, x=0, y=0, w=w, h=h)
        else:
            pdf.image(io.BytesIO(image_bytes(image, "JPEG", quality=jpeg_quality)), x=0, y=0, w=w, h=h)
    return bytes(pdf.output())


def rotated_scan_pdf(pdf: bytes, degrees: int, dpi: int = 200, seed: int | None = None) -> bytes:
    """`pdf` rendered, each page image turned `degrees` (90, 180, 270) CLOCKWISE, as a scanner
    fed sideways produces, and wrapped as an image-only PDF (no /Rotate entry, no text layer).
    With `seed`, each page is also `degrade`d. To read it, turn it back `degrees` counter-clockwise.
    Ground truth: the text of `pdf`."""
    if degrees % 90 or not 0 < degrees < 360:
        raise ValueError("degrees must be 90, 180 or 270")
    images = render_pages(pdf, dpi)
    if seed is not None:
        images = [degrade(image, seed + i) for i, image in enumerate(images)]
    return scan_pdf([image.rotate(-degrees, expand=True) for image in images], dpi)


def rotate_flag_pdf(pdf: bytes, degrees: int) -> bytes:
    """`pdf` with every page's /Rotate set to `degrees` (0, 90, 180, 270; clockwise on display):
    the content stream and text layer are untouched. Ground truth: the text of `pdf`. PDFium's
    text layer follows the displayed orientation: with 90 it returns the lines in REVERSE order
    (bottom line first); with 180 and 270, in the original order (PDFium 8149, pypdfium2 5.15)."""
    doc = pdfium.PdfDocument(pdf)
    try:
        for i in range(len(doc)):
            doc[i].set_rotation(degrees)
        buf = io.BytesIO()
        doc.save(buf)
        return buf.getvalue()
    finally:
        doc.close()


def photo(width: int = 400, height: int = 300, seed: int = 1) -> Image.Image:
    """A picture with no text in it: smooth colour and grain, as a photograph has."""
    rng = np.random.default_rng(seed)
    x = np.broadcast_to(np.linspace(0, 1, width)[None, :, None], (height, width, 1))
    y = np.broadcast_to(np.linspace(0, 1, height)[:, None, None], (height, width, 1))
    base = np.concatenate([x * 200 + 30, y * 180 + 40, (1 - x) * 160 + 60], axis=2)
    grain = rng.normal(0, 25, (height, width, 3))
    return Image.fromarray(np.clip(base + grain, 0, 255).astype("uint8"), "RGB")


def pdf_with_picture(lines: Sequence[str], dpi: int = 150) -> bytes:
    """One A4 page: `lines` as real text (DejaVu, 12 pt) and, under them, `photo()` placed
    at 400 x 300 pixels of a `dpi` rendering, its top-left 100 mm down and 40 mm in.
    Ground truth: `lines`, and one figure."""
    pdf = _fpdf("DejaVuSans.ttf", 12)
    pdf.add_page()
    _write_lines(pdf, lines, 12)
    pdf.image(io.BytesIO(image_bytes(photo(), "PNG")), x=40, y=100, w=400 / dpi * 25.4, h=300 / dpi * 25.4)
    return bytes(pdf.output())


def pdf_mostly_image_with_caption(lines: Sequence[str], caption: str, seed: int = 0,
                                  dpi: int = 150) -> bytes:
    """One A4 page: `caption` as real text (DejaVu, 12 pt) at the top, and under it a degraded
    scan of `lines` (rendered A4 at `dpi`) covering about 72% of the page, no text layer of its own.
    Ground truth: `caption`, then `lines`. The text layer holds only `caption`."""
    scan = degrade(render_pages(ru_pdf([lines]), dpi)[0], seed)
    pdf = _fpdf("DejaVuSans.ttf", 12)
    pdf.add_page()
    _write_lines(pdf, [caption], 12, top_mm=10)
    w = _A4_MM[0] * 0.85
    h = _A4_MM[1] * 0.85
    pdf.image(io.BytesIO(image_bytes(scan, "JPEG", quality=90)), x=(_A4_MM[0] - w) / 2, y=30, w=w, h=h)
    return bytes(pdf.output())


def transparent_png_white_text(lines: Sequence[str], size: int = 40,
                               background: tuple[int, int, int] = (0, 0, 0)) -> bytes:
    """An RGBA PNG: every background pixel is `background` with alpha 0 (fully transparent), the
    text is pure white (255, 255, 255) with alpha 255 (anti-aliased edges: white, partial alpha).
    Dropping the alpha channel shows white text on `background`; compositing on white shows
    nothing. Ground truth: `lines`."""
    font = _pil_font(size)
    step = int(size * 1.6)
    width = max(int(font.getlength(line)) for line in lines) + 2 * size
    height = step * len(lines) + 2 * size
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for i, line in enumerate(lines):
        draw.text((size, size + i * step), line, fill=255, font=font)
    image = Image.new("RGBA", (width, height), (*background, 0))
    white = Image.new("RGBA", (width, height), (255, 255, 255, 255))
    image.paste(white, (0, 0), mask)
    return image_bytes(image, "PNG")


# -- PDF byte surgery ----------------------------------------------------------------------------

class _RawPdf:
    """A classic-xref PDF (as fpdf2 writes it, or `_hand_pdf`) split into its objects, to edit
    them and write it back with a correct cross-reference table."""

    def __init__(self, data: bytes) -> None:
        xref_at = int(re.findall(rb"startxref\s+(\d+)", data)[-1])
        m = re.match(rb"xref\s+0 (\d+)\s+", data[xref_at:])
        if m is None:
            raise ValueError("no classic xref table")
        count = int(m.group(1))
        table = data[xref_at + m.end():]
        offsets = {}
        for i in range(1, count):
            entry = table[i * 20:i * 20 + 20]
            if entry[17:18] == b"n":
                offsets[i] = int(entry[:10])
        ordered = sorted(offsets.items(), key=lambda item: item[1])
        self.header = data[:ordered[0][1]]
        self.objects: dict[int, bytes] = {}
        for (num, start), (_, end) in zip(ordered, [*ordered[1:], (0, xref_at)], strict=True):
            self.objects[num] = data[start:end]
        trailer = re.search(rb"trailer\s*(<<.*?>>)\s*startxref", data[xref_at:], re.S)
        assert trailer is not None
        self.trailer = trailer.group(1)

    def dict_of(self, num: int) -> bytes:
        """The object's text up to its stream data (its dictionary)."""
        obj = self.objects[num]
        return obj.split(b"stream", 1)[0]

    def edit(self, num: int, fn: Callable[[bytes], bytes]) -> None:
        """Replace the object's dictionary part by fn(dictionary); stream data kept as is."""
        obj = self.objects[num]
        head, sep, rest = obj.partition(b"stream")
        self.objects[num] = fn(head) + sep + rest

    def edit_stream(self, num: int, fn: Callable[[bytes], bytes]) -> None:
        """Replace the object's (decoded) stream data by fn(data), re-encoded, /Length fixed."""
        obj = self.objects[num]
        head, _, rest = obj.partition(b"stream")
        length_m = re.search(rb"/Length (\d+)", head)
        assert length_m is not None
        start = 2 if rest.startswith(b"\r\n") else 1
        raw = rest[start:start + int(length_m.group(1))]
        flate = b"/FlateDecode" in head
        data = fn(zlib.decompress(raw) if flate else raw)
        raw = zlib.compress(data) if flate else data
        head = head[:length_m.start()] + b"/Length %d" % len(raw) + head[length_m.end():]
        self.objects[num] = head + b"stream\n" + raw + b"\nendstream\nendobj\n"

    def page_numbers(self) -> list[int]:
        """Object numbers of the pages, in order (a flat /Pages tree, as fpdf2 writes)."""
        root_m = re.search(rb"/Root (\d+) 0 R", self.trailer)
        assert root_m is not None
        pages_m = re.search(rb"/Pages (\d+) 0 R", self.dict_of(int(root_m.group(1))))
        assert pages_m is not None
        kids = re.search(rb"/Kids\s*\[(.*?)\]", self.dict_of(int(pages_m.group(1))), re.S)
        assert kids is not None
        return [int(n) for n in re.findall(rb"(\d+) 0 R", kids.group(1))]

    def pages_root(self) -> int:
        root_m = re.search(rb"/Root (\d+) 0 R", self.trailer)
        assert root_m is not None
        pages_m = re.search(rb"/Pages (\d+) 0 R", self.dict_of(int(root_m.group(1))))
        assert pages_m is not None
        return int(pages_m.group(1))

    def find(self, pattern: bytes) -> list[tuple[int, re.Match[bytes]]]:
        """(object number, match) for `pattern` in each object's dictionary."""
        return [(num, m) for num in sorted(self.objects) for m in re.finditer(pattern, self.dict_of(num))]

    def tobytes(self) -> bytes:
        out = bytearray(self.header)
        offsets: dict[int, int] = {}
        for num in sorted(self.objects):
            offsets[num] = len(out)
            out += self.objects[num]
        size = max(offsets) + 1
        xref_at = len(out)
        out += b"xref\n0 %d\n0000000000 65535 f \n" % size
        for num in range(1, size):
            out += b"%010d 00000 n \n" % offsets[num] if num in offsets else b"0000000000 65535 f \n"
        trailer = re.sub(rb"/Size \d+", b"/Size %d" % size, self.trailer)
        out += b"trailer\n" + trailer + b"\nstartxref\n%d\n%%%%EOF\n" % xref_at
        return bytes(out)


def _set_mediabox(raw: _RawPdf, num: int, box: Sequence[float]) -> None:
    text = b"/MediaBox [" + " ".join(f"{v:g}" if v != int(v) else str(int(v)) for v in box).encode() + b"]"

    def fn(head: bytes) -> bytes:
        if b"/MediaBox" in head:
            return re.sub(rb"/MediaBox\s*\[[^\]]*\]", text, head)
        return head.replace(b"<<", b"<<\n" + text, 1)

    raw.edit(num, fn)


def pdf_with_broken_page(good_lines: Sequence[str],
                         bad_lines: Sequence[str] = ("Эта страница не должна читаться.",),
                         how: Literal["not-a-page", "dangling", "no-contents"] = "not-a-page") -> bytes:
    """A 2-page PDF that PDFium opens with 2 pages; page 1 holds `good_lines` and is fine.

    how="not-a-page": page 2's dictionary has /Type /Junk instead of /Type /Page;
    how="dangling": /Kids points page 2 at object 9999, which does not exist.
    In both, pypdfium2 `pdf[1]` (FPDF_LoadPage) raises PdfiumError("Failed to load page.").
    how="no-contents": page 2's /Contents points at a missing object: the page loads and
    renders blank with an empty text layer. Ground truth: `good_lines`, then nothing.
    """
    data = ru_pdf([good_lines, bad_lines])
    raw = _RawPdf(data)
    page2 = raw.page_numbers()[1]
    if how == "not-a-page":
        raw.edit(page2, lambda head: head.replace(b"/Type /Page", b"/Type /Junk"))
    elif how == "dangling":
        raw.edit(raw.pages_root(), lambda head: head.replace(b"%d 0 R]" % page2, b"9999 0 R]"))
    else:
        raw.edit(page2, lambda head: re.sub(rb"/Contents \d+ 0 R", b"/Contents 9999 0 R", head))
    return raw.tobytes()


def _cp1251_as_latin1(code: int) -> int:
    try:
        return chr(code).encode("cp1251")[0] if code > 0x7F else code
    except UnicodeEncodeError:
        return 0xFFFD


def pdf_garbage_text_layer(lines: Sequence[str],
                           how: Literal["latin1", "pua", "none"] = "latin1") -> bytes:
    """One A4 page that RENDERS `lines` correctly (DejaVu embedded) but whose text layer is wrong.

    how="latin1": the /ToUnicode CMap maps each glyph to the Latin-1 character of its cp1251 byte,
    so "Решение" extracts as "Ðåøåíèå" (ASCII, digits and spaces stay right);
    how="pua": each non-ASCII glyph maps into the private use area (U+E000 + its code point's
    low 12 bits); how="none": the /ToUnicode entry is removed and PDFium returns the raw glyph
    codes as control characters. Ground truth (what OCR should read): `lines`.
    """
    raw = _RawPdf(ru_pdf([lines]))
    found = raw.find(rb"/ToUnicode (\d+) 0 R")
    assert found, "fpdf2 wrote no /ToUnicode"
    for font_num, m in found:
        if how == "none":
            raw.edit(font_num, lambda head: re.sub(rb"/ToUnicode \d+ 0 R\s*", b"", head))
            continue

        def remap(cmap: bytes) -> bytes:
            def one(entry: re.Match[bytes]) -> bytes:
                code = int(entry.group(2), 16)
                if code <= 0x7F:
                    new = code
                elif how == "latin1":
                    new = _cp1251_as_latin1(code)
                else:
                    new = 0xE000 + (code & 0xFFF)
                return entry.group(1) + b"<%04X>" % new

            return re.sub(rb"(<[0-9A-Fa-f]{4}> )<([0-9A-Fa-f]{4})>", one, cmap)

        raw.edit_stream(int(m.group(1)), remap)
    return raw.tobytes()


# What an OCR that knew no Russian made of Cyrillic letters: the Latin shapes nearest to
# them, as old scanners' and archive digitisers' text layers show (`Hanorosa:t` for
# «Налоговая»).
_FOREIGN_OCR = dict(zip(
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ",
    ["a", "6", "B", "r", "A", "e", "e", ">K", "3", "u", "u", "k", "n", "M", "H", "o", "n", "p",
     "c", "T", "y", "qp", "x", "u,", "4", "w", "w,", "b", "bI", "b", "3", "IO", ":t",
     "A", "6", "B", "F", "A", "E", "E", "X", "3", "N", "N", "K", "JI", "M", "H", "O", "II", "P",
     "C", "T", "Y", "O", "X", "U", "4", "W", "W", "b", "bI", "b", "3", "IO", "R"], strict=True))
# Cyrillic letters and the Latin ones drawn the same.
LOOKALIKE = dict(zip("АВЕКМНОРСТХаеорсух", "ABEKMHOPCTXaeopcyx", strict=True))


def foreign_ocr(line: str) -> str:
    return "".join(_FOREIGN_OCR.get(ch, ch) for ch in line)


def ocr_layer_scan_pdf(lines: Sequence[str], layer: Sequence[str] | None = None,
                       dpi: int = 150) -> bytes:
    """One A4 page as an archive digitiser makes it: a scan of `lines` covering the page and,
    over it, an invisible text layer (render mode 3) with `layer`, line for line where the
    scan shows them; by default what an OCR that knew no Russian read (`foreign_ocr`).
    Ground truth (what the page shows): `lines`."""
    scan = render_pages(ru_pdf([lines]), dpi)[0]
    pdf = _fpdf("DejaVuSans.ttf", 12)
    pdf.add_page()
    pdf.image(io.BytesIO(image_bytes(scan, "JPEG", quality=85)), x=0, y=0, w=_A4_MM[0], h=_A4_MM[1])
    pdf.text_mode = "INVISIBLE"
    layer_lines = [foreign_ocr(line) for line in lines] if layer is None else list(layer)
    step = 12 * 1.5 / _MM
    for i, line in enumerate(layer_lines):
        pdf.text(_LEFT_MM, _TOP_MM + 12 / _MM + i * step, line)
    return bytes(pdf.output())


def pdf_lookalike_text_layer(lines: Sequence[str]) -> bytes:
    """One A4 page that renders `lines` right but whose text layer gives the Latin letter
    for every Cyrillic one drawn the same (`Пocтавщик`): a font mapped to the wrong
    alphabet. Ground truth (what OCR should read): `lines`."""
    raw = _RawPdf(ru_pdf([lines]))
    found = raw.find(rb"/ToUnicode (\d+) 0 R")
    assert found, "fpdf2 wrote no /ToUnicode"
    latin = {ord(k): ord(v) for k, v in LOOKALIKE.items()}

    def remap(cmap: bytes) -> bytes:
        def one(entry: re.Match[bytes]) -> bytes:
            code = int(entry.group(2), 16)
            return entry.group(1) + b"<%04X>" % latin.get(code, code)

        return re.sub(rb"(<[0-9A-Fa-f]{4}> )<([0-9A-Fa-f]{4})>", one, cmap)

    for _font_num, m in found:
        raw.edit_stream(int(m.group(1)), remap)
    return raw.tobytes()


def pdf_broken_page_tree(pages: Sequence[Sequence[str]],
                         how: Literal["pages_ref", "root_ref", "no_tree"] = "pages_ref") -> bytes:
    """A born-digital PDF whose page tree cannot be reached, while every page object is
    intact (pdf.js and browsers show it; PDFium and qpdf find no pages). how="pages_ref":
    the catalog's /Pages names an object that is not there; "root_ref": the trailer's /Root
    does; "no_tree": the page tree node itself is gone (the pages' /Parent points nowhere).
    Ground truth: `pages`."""
    raw = _RawPdf(ru_pdf(pages))
    if how == "root_ref":
        raw.trailer = re.sub(rb"/Root \d+ 0 R", b"/Root 9998 0 R", raw.trailer)
    elif how == "no_tree":
        del raw.objects[raw.pages_root()]
    else:
        root_m = re.search(rb"/Root (\d+) 0 R", raw.trailer)
        assert root_m is not None
        raw.edit(int(root_m.group(1)), lambda head: re.sub(rb"/Pages \d+ 0 R", b"/Pages 9999 0 R", head))
    return raw.tobytes()


def hand_pdf(objects: Sequence[bytes]) -> bytes:
    """A PDF from object bodies numbered 1..n; object 1 is the catalog."""
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref_at = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref_at)
    return bytes(out)


def _stream(data: bytes, extra: bytes = b"") -> bytes:
    return b"<< /Length %d%s >>\nstream\n" % (len(data), extra) + data + b"\nendstream"


def pdf_bomb(operators: int) -> bytes:
    """A one-page PDF whose few hundred kilobytes of content stream inflate to `operators`
    path operators (14 bytes each): 20 million make PDFium want gigabytes to load the
    page, and abort when it cannot have them."""
    compressor = zlib.compressobj(9)
    chunk = b"0 0 m 1 1 l S\n" * 100_000
    data = b"".join(compressor.compress(chunk) for _ in range(operators // 100_000)) + compressor.flush()
    return hand_pdf([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R >>",
        _stream(data, b" /Filter /FlateDecode"),
    ])


def pdf_nonembedded_font(lines: Sequence[str] = CYRILLIC_ONLY, size: float = 16,
                         base_font: str = "NoSuchFont-Regular") -> bytes:
    """One A4 page whose text uses a Type0/CIDFontType2 font (Identity-H) that is NOT embedded
    (no /FontFile2), with a /ToUnicode CMap; the glyph codes are arbitrary (1, 2, ... in order of
    first appearance of each character).

    Text layer: exactly `lines` (joined by "\\r\\n"). Rendering: PDFium substitutes its built-in
    Latin font, looked up through /ToUnicode, so Cyrillic draws NOTHING (the page is blank for
    CYRILLIC_ONLY) while Latin letters and digits draw in the substitute face. That needs a PDFium
    without a Cyrillic-capable substitute (pypdfium2's bundled build was, at the time of writing).
    Ground truth: `lines`.
    """
    chars = list(dict.fromkeys("".join(lines)))
    cid = {c: i + 1 for i, c in enumerate(chars)}
    leading = size * 1.5
    content = b"BT /F1 %g Tf %g TL %g %g Td\n" % (size, leading, _LEFT_MM * _MM, 842 - _TOP_MM * _MM)
    for line in lines:
        content += b"<" + "".join(f"{cid[c]:04X}" for c in line).encode() + b"> Tj T*\n"
    content += b"ET"
    bfchar = "".join(f"<{cid[c]:04X}> <{ord(c):04X}>\n" for c in chars)
    cmap = (
        "/CIDInit /ProcSet findresource begin\n12 dict begin\nbegincmap\n"
        "/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def\n"
        "/CMapName /Adobe-Identity-UCS def\n/CMapType 2 def\n"
        "1 begincodespacerange\n<0000> <FFFF>\nendcodespacerange\n"
        f"{len(chars)} beginbfchar\n{bfchar}endbfchar\n"
        "endcmap\nCMapName currentdict /CMap defineresource pop\nend\nend"
    ).encode()
    name = base_font.encode()
    return hand_pdf([
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 /MediaBox [0 0 595.28 841.89] >>",
        b"<< /Type /Page /Parent 2 0 R /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        _stream(content),
        b"<< /Type /Font /Subtype /Type0 /BaseFont /" + name
        + b" /Encoding /Identity-H /DescendantFonts [6 0 R] /ToUnicode 8 0 R >>",
        b"<< /Type /Font /Subtype /CIDFontType2 /BaseFont /" + name
        + b" /CIDSystemInfo << /Registry (Adobe) /Ordering (Identity) /Supplement 0 >>"
        + b" /FontDescriptor 7 0 R /DW 600 /CIDToGIDMap /Identity >>",
        b"<< /Type /FontDescriptor /FontName /" + name + b" /Flags 32 /FontBBox [0 -200 1000 900]"
        + b" /ItalicAngle 0 /Ascent 900 /Descent -200 /CapHeight 700 /StemV 80 >>",
        _stream(cmap),
    ])


def zero_area_pdf(mediabox: Sequence[float] = (0, 0, 612, 0),
                  lines: Sequence[str] = ("Нулевая площадь страницы",)) -> bytes:
    """One page (text `lines` in its content) whose own /MediaBox is `mediabox`, e.g.
    (0, 0, 0, 0) or (0, 0, 612, 0). PDFium treats an empty MediaBox as US Letter: get_size()
    returns (612, 792). Ground truth: nothing sensible; the page has no area."""
    raw = _RawPdf(ru_pdf([lines]))
    _set_mediabox(raw, raw.page_numbers()[0], mediabox)
    return raw.tobytes()


def huge_page_pdf(height: float = 2.0**31, width: float = 595.28,
                  lines: Sequence[str] = ("Огромная страница",)) -> bytes:
    """One page whose /MediaBox is [0 0 width height] (default height 2**31 points, about
    757 km); the text sits at the page's original A4 position, i.e. at its very bottom. Rendering
    it at any normal dpi needs an absurd bitmap. Ground truth: `lines` (unreachable in practice)."""
    raw = _RawPdf(ru_pdf([lines]))
    _set_mediabox(raw, raw.page_numbers()[0], (0, 0, width, height))
    return raw.tobytes()


# -- broken rasters ------------------------------------------------------------------------------

def text_image(lines: Sequence[str], size: int = 32, mode: str = "L") -> Image.Image:
    """Black DejaVu text on white, `size` px, one line per row; sized to fit."""
    font = _pil_font(size)
    step = int(size * 1.6)
    width = max(int(font.getlength(line)) for line in lines) + 2 * size
    image = Image.new(mode, (width, step * len(lines) + 2 * size), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((size, size + i * step), line, fill="black", font=font)
    return image


def broken_tiff(lines: Sequence[str] = RUSSIAN_TEXT[0][:12], rows_per_strip: int = 32,
                compression: Literal["tiff_lzw", "group4"] = "tiff_lzw") -> bytes:
    """A TIFF of `lines` in strips of `rows_per_strip` rows whose middle strip is damaged: its
    compressed data is overwritten from its 8th byte on. Ground truth: `lines`; the strips
    before the damaged one are intact.

    "tiff_lzw" (grayscale): overwritten with 0xFF (9-bit code 511, beyond the table), libtiff's
    LZWDecode writes "tempfile.tif: Using code not yet in table." to stderr and Pillow's load()
    raises OSError("decoder error -2").
    "group4" (bilevel, CCITT G4): overwritten with 0x00, libtiff writes "Fax4Decode: Bad code word
    at line 0 of strip N (x ...)." to stderr and Pillow's load() SUCCEEDS, silently returning an
    image with the damaged strip garbled; no exception, no Python warning.
    """
    image = text_image(lines)
    if compression == "group4":
        image = image.convert("1")
    buf = io.BytesIO()
    image.save(buf, format="TIFF", compression=compression, tiffinfo={278: rows_per_strip})
    data = bytearray(buf.getvalue())
    with Image.open(io.BytesIO(bytes(data))) as parsed:
        offsets = parsed.tag_v2[273]
        counts = parsed.tag_v2[279]
    middle = len(offsets) // 2
    start, count = offsets[middle], counts[middle]
    fill = b"\xff" if compression == "tiff_lzw" else b"\x00"
    data[start + 8:start + count] = fill * (count - 8)
    return bytes(data)


def _rle8(image: Image.Image) -> bytes:
    """BI_RLE8 data for an "L" image, bottom-up, encoded runs only."""
    out = bytearray()
    pixels = image.tobytes()
    w = image.width
    for y in range(image.height - 1, -1, -1):
        row = pixels[y * w:(y + 1) * w]
        x = 0
        while x < w:
            run = 1
            while x + run < w and run < 255 and row[x + run] == row[x]:
                run += 1
            out += bytes((run, row[x]))
            x += run
        out += b"\x00\x00"  # end of line
    out += b"\x00\x01"  # end of bitmap
    return bytes(out)


def broken_rle_bmp(lines: Sequence[str] = RUSSIAN_TEXT[0][:6], keep: float = 0.5,
                   how: Literal["truncated", "bad-delta"] = "truncated") -> bytes:
    """An 8-bit BI_RLE8 BMP (grayscale palette) of `lines` with a broken RLE stream; the headers
    still claim the full stream. Ground truth: `lines`.

    "truncated": the stream is cut after `keep` of its bytes (no end-of-bitmap marker). BMP rows
    run bottom-up, so only the bottom part is there; Pillow's load() raises
    ValueError("not enough image data"), even with ImageFile.LOAD_TRUNCATED_IMAGES = True.
    "bad-delta": the full stream, but at `keep` a delta escape (00 02 00 FF) jumps 255 rows up,
    past the top of the bitmap: Pillow fills everything after it with palette index 0 (black)
    and returns a complete image, silently (no exception, warning or stderr); the top part of
    the picture is a black block.
    """
    image = text_image(lines)
    rle = _rle8(image)
    at = int(len(rle) * keep) & ~1
    if how == "truncated":
        stream = rle[:at]
    else:
        stream = rle[:at] + b"\x00\x02\x00\xff" + rle[at:]
    palette = b"".join(bytes((v, v, v, 0)) for v in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, image.width, image.height, 1, 8, 1, len(rle), 2835, 2835, 256, 0)
    header = b"BM" + struct.pack("<IHHI", offset + len(rle), 0, 0, offset)
    return header + info + palette + stream


def pillow_load_report(data: bytes) -> dict[str, object]:
    """What Pillow does on Image.open(BytesIO(data)).load(): the exception (if any), Python
    warnings, what the C libraries wrote to fd 2, and the ink fraction of what was decoded."""
    saved_fd = os.dup(2)
    report: dict[str, object] = {}
    with tempfile.TemporaryFile() as err, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sys.stderr.flush()
        os.dup2(err.fileno(), 2)
        image = None
        try:
            image = Image.open(io.BytesIO(data))
            report["size"] = image.size
            image.load()
            report["raised"] = None
        except Exception as exc:
            report["raised"] = f"{type(exc).__name__}: {exc}"
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        err.seek(0)
        report["stderr"] = err.read().decode(errors="replace").strip()
        report["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
        report["ink"] = None
        if image is not None and report["raised"] is None:
            report["ink"] = round(ink_fraction(image), 4)
    return report


# -- self-check ----------------------------------------------------------------------------------

def _check() -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []

    def row(name: str, result: str) -> None:
        rows.append((name, result))
        print(f"{name:<28} {result}", flush=True)

    for pages in (RUSSIAN_TEXT, MIXED_TEXT):
        assert all(len(line) <= 70 for page in pages for line in page)

    doc = ru_pdf(RUSSIAN_TEXT)
    texts = pdf_text(doc)
    assert [normalise(t) for t in texts] == [normalise(p) for p in RUSSIAN_TEXT]
    images = render_pages(doc, 200)
    assert [im.size for im in images] == [(1654, 2339)] * 3
    row("ru_pdf", f"{len(doc)} B, 3 pages, text layer == RUSSIAN_TEXT, ink {ink_fraction(images[0]):.3f}")
    for font in ("DejaVuSerif.ttf", "DejaVuSansMono.ttf"):
        other = ru_pdf(MIXED_TEXT, font=font, size=11)
        assert normalise(pdf_text(other)[0]) == normalise(MIXED_TEXT[0])
    row("ru_pdf Serif/Mono MIXED", "text layer == MIXED_TEXT")
    locked = ru_pdf(MIXED_TEXT, password="sekret")
    try:
        pdfium.PdfDocument(locked)
        raise AssertionError("opened without a password")
    except pdfium.PdfiumError as exc:
        opened = f"no password: {exc}"
    assert normalise(pdf_text(locked, password="sekret")[0]) == normalise(MIXED_TEXT[0])
    row("ru_pdf password", opened + "; with it: text ok")

    scans = [degrade(im, seed) for seed, im in enumerate(images)]
    assert degrade(images[0], 0).tobytes() == scans[0].tobytes()
    scanned = scan_pdf(scans)
    assert pdf_text(scanned) == ["", "", ""]
    back = render_pages(scanned, 200)
    assert [im.size for im in back] == [im.size for im in scans]
    row("degrade + scan_pdf",
        f"{len(scanned)} B, no text layer, sizes round-trip, ink {ink_fraction(back[0]):.3f}")

    orders = []
    for degrees in (90, 180, 270):
        turned = rotated_scan_pdf(ru_pdf(RUSSIAN_TEXT[:1]), degrees, seed=1)
        size = render_pages(turned, 200)[0].size
        assert size == ((2339, 1654) if degrees != 180 else (1654, 2339)) and pdf_text(turned) == [""]
        flagged = rotate_flag_pdf(ru_pdf(RUSSIAN_TEXT[:1]), degrees)
        page = pdfium.PdfDocument(flagged)[0]
        assert page.get_rotation() == degrees
        assert render_pages(flagged, 200)[0].size == size
        got = page.get_textpage().get_text_range().split("\r\n")
        assert sorted(got) == sorted(RUSSIAN_TEXT[0])
        orders.append(f"{degrees}:" + ("same" if got == RUSSIAN_TEXT[0] else
                                       "reversed" if got == RUSSIAN_TEXT[0][::-1] else "shuffled"))
    row("rotated_scan/rotate_flag", "90/180/270: sizes swap, scan has no text; flag keeps the lines, "
        f"line order {' '.join(orders)}")

    for how in ("not-a-page", "dangling", "no-contents"):
        broken = pdfium.PdfDocument(pdf_with_broken_page(RUSSIAN_TEXT[0][:5], how=how))
        assert len(broken) == 2
        first = broken[0]
        assert normalise(first.get_textpage().get_text_range()) == normalise(RUSSIAN_TEXT[0][:5])
        assert ink_fraction(first.render(scale=1).to_pil()) > 0
        try:
            second = broken[1]
            blank = ink_fraction(second.render(scale=1).to_pil())
            text = second.get_textpage().get_text_range()
            outcome = f"pdf[1] loads, renders ink {blank:.4f}, text {text!r}"
            assert how == "no-contents" and blank == 0
        except pdfium.PdfiumError as exc:
            outcome = f"pdf[1] raises PdfiumError({exc})"
            assert how != "no-contents"
        row(f"broken_page {how}", f"len 2, page 1 ok; {outcome}")

    png = transparent_png_white_text(CYRILLIC_ONLY)
    with Image.open(io.BytesIO(png)) as im:
        arr = np.asarray(im)
        assert im.mode == "RGBA" and (arr[..., 3] == 0).mean() > 0.8
        assert ((arr[..., 3] == 255) <= (arr[..., :3] == 255).all(axis=2)).all()
        row("transparent_png", f"{im.size}, {(arr[..., 3] == 0).mean():.3f} transparent, opaque px white")

    for label, lines in (("CYRILLIC_ONLY", CYRILLIC_ONLY), ("MIXED[:3]", MIXED_TEXT[0][:3])):
        ne = pdf_nonembedded_font(lines, size=12)
        assert normalise(pdf_text(ne)[0]) == normalise(lines)
        ink = ink_fraction(render_pages(ne)[0])
        embedded = ink_fraction(render_pages(ru_pdf([lines], size=12))[0])
        row(f"nonembedded {label}", f"text layer exact; ink {ink:.5f} (embedded DejaVu: {embedded:.5f})")
        if label == "CYRILLIC_ONLY":
            assert ink == 0, "this PDFium substitutes a Cyrillic-capable font"

    for how in ("latin1", "pua", "none"):
        garbage = pdf_garbage_text_layer(RUSSIAN_TEXT[0][:3], how=how)
        ink = ink_fraction(render_pages(garbage)[0])
        reference = ink_fraction(render_pages(ru_pdf([RUSSIAN_TEXT[0][:3]]))[0])
        got = pdf_text(garbage)[0]
        assert abs(ink - reference) < 1e-9 and normalise(got) != normalise(RUSSIAN_TEXT[0][:3])
        row(f"garbage_text {how}", f"renders as original (ink {ink:.4f}); text {got.splitlines()[0][:34]!r}")

    caption = "Акт приёма-передачи № 7 от 01.02.2024"
    mostly = pdf_mostly_image_with_caption(RUSSIAN_TEXT[0][:15], caption)
    assert normalise(pdf_text(mostly)[0]) == normalise(caption)
    ink = ink_fraction(render_pages(mostly)[0])
    row("mostly_image", f"{len(mostly)} B, text layer == caption, ink {ink:.3f}")

    for box in ((0, 0, 0, 0), (0, 0, 612, 0)):
        page = pdfium.PdfDocument(zero_area_pdf(box))[0]
        assert page.get_size() == (612, 792)
        row(f"zero_area {list(box)}", f"opens; get_size {page.get_size()}")
    page = pdfium.PdfDocument(huge_page_pdf())[0]
    assert page.get_size()[1] == 2.0**31
    row("huge_page 2**31", f"opens; get_size {page.get_size()}")

    for setting in (False, True):
        ImageFile.LOAD_TRUNCATED_IMAGES = setting
        cases = (("tiff lzw", broken_tiff()), ("tiff group4", broken_tiff(compression="group4")),
                 ("rle8 truncated", broken_rle_bmp()), ("rle8 bad-delta", broken_rle_bmp(how="bad-delta")))
        for name, data in cases:
            r = pillow_load_report(data)
            assert r["warnings"] == []
            if name == "tiff lzw":
                assert str(r["raised"]).startswith("OSError") and "not yet in table" in str(r["stderr"])
            elif name == "tiff group4":
                assert r["raised"] is None and "Bad code word" in str(r["stderr"])
            elif name == "rle8 truncated":
                assert r["raised"] == "ValueError: not enough image data" and not r["stderr"]
            else:
                assert r["raised"] is None and not r["stderr"]
            row(f"{name} TRUNC={setting}",
                f"raised={r['raised']}; warnings={r['warnings']}; stderr={r['stderr']!r}; ink={r['ink']}")
    tiff_ink = ink_fraction(text_image(RUSSIAN_TEXT[0][:12]).convert("1"))
    row("undamaged ink", f"tiff {tiff_ink:.4f}, bmp {ink_fraction(text_image(RUSSIAN_TEXT[0][:6])):.4f}")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    return rows


if __name__ == "__main__":
    print(f"PDFium {pdfium.PDFIUM_INFO}, pypdfium2 {pdfium.PYPDFIUM_INFO}, Pillow {Image.__version__}")
    _check()
    print("all checks passed")

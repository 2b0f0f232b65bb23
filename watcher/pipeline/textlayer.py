"""The text layer: a PDF page's own text, read with its boxes, and whether to trust it.

A PDF made by Word or LaTeX carries its exact text; reading it back from pixels loses
accuracy and costs seconds a page. It cannot always be trusted: scans have none, a scan
run through OCR once has another OCR's text, broken fonts give private-use code points,
replacement characters or Windows-1251 bytes read as Latin-1 (`Ðåøåíèå`), and text drawn
as outlines or pictures is not in it at all. `read_text_layer` says which, with a reason.

Lines come in content order (the order Word and LaTeX write them, which is reading
order), each as one block with its box in the page's pixel coordinates, the same ones an
OCR reading of the rendered page uses; lines closer than a line's height share a
paragraph.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import unicodedata
from dataclasses import dataclass, field

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from watcher.core.pages import Block, PageResult, TextSource, with_figures

# number alone says nothing about what else is drawn there.
MIN_CHARS = 32
# Shares of the visible characters that make a text layer garbage.
MAX_BROKEN_SHARE = 0.02
MAX_LATIN1_LETTER_SHARE = 0.3
MIN_PLAIN_SHARE = 0.85
# A page whose pictures cover this much of it is a scan unless its text covers them.
IMAGE_PAGE_SHARE = 0.5
MIN_TEXT_OVER_IMAGES = 0.02
# Pictures smaller than this on either side (at the render resolution) are not figures.
MIN_PICTURE_PIXELS = 32
# Text this share of which is invisible or on pictures was left by an OCR over a scan.
HIDDEN_LAYER_SHARE = 0.5
# Many more drawn paths than characters: text drawn as outlines (a CAD export, a logo page).
PATHS_PER_CHAR = 3
MIN_PATHS_SUSPECT = 500


@dataclass
class Char:
    text: str
    box: tuple[float, float, float, float] | None  # left, bottom, right, top in PDF points
    broken: bool
    invisible: bool = False  # text render mode 3: drawn over a scan by an OCR, not shown


@dataclass
class TextLayer:
    """What the page's text layer holds, and whether it can stand in for OCR."""

    result: PageResult
    trusted: bool
    reason: str
    chars: int
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def left_by_an_ocr(self) -> bool:
        """Most of its text is invisible or lies on pictures: an earlier OCR's reading of a
        scan, as good as that OCR was, not the author's text."""
        return self.stats.get("hidden_share", 0.0) >= HIDDEN_LAYER_SHARE


def read_text_layer(page: pdfium.PdfPage, index: int, width: int, height: int) -> TextLayer:
    """The page's text as blocks, and a verdict. `width` x `height` are the pixels of the
    page as rendered; the blocks are in that frame turned so that the text is upright (a
    page shown sideways through /Rotate, or whose lines run up the page, is turned)."""
    textpage = page.get_textpage()
    try:
        chars = _chars(textpage)
        turns = _upright_turns(page, textpage, len(chars))
    finally:
        textpage.close()
    visible = [c for c in chars if not c.text.isspace()]
    if turns % 2:
        width, height = height, width
    frame = _PixelFrame(page, width, height, turns)
    blocks = _blocks(chars, frame)
    drawn = _drawn(page)
    result = PageResult(
        index=index, width=width, height=height,
        blocks=with_figures(blocks, _pictures(page, drawn[0], frame)),
        markdown=_markdown(blocks), text_source=TextSource.TEXT_LAYER.value,
        rotation=(360 - 90 * turns) % 360,
    )
    trusted, reason, stats = _verdict(page, visible, drawn)
    return TextLayer(result, trusted, reason, len(visible), stats)


def _upright_turns(page: pdfium.PdfPage, textpage: pdfium.PdfTextPage, count: int) -> int:
    """Quarter turns clockwise from the page as shown to the frame its text reads in."""
    angles: dict[int, int] = {}
    for i in range(0, count, max(1, count // 200)):  # a sample is plenty
        angle = pdfium_c.FPDFText_GetCharAngle(textpage, i)
        if angle >= 0:
            quarter = round(math.degrees(angle) / 90) % 4
            angles[quarter] = angles.get(quarter, 0) + 1
    text_quarters = max(angles, key=lambda q: angles[q]) if angles else 0
    shown_quarters = (int(page.get_rotation()) // 90) % 4
    return (text_quarters - shown_quarters) % 4


def _chars(textpage: pdfium.PdfTextPage) -> list[Char]:
    # Per-character calls rather than get_text_range: that one is UCS-2 only and its
    # indices drift from the character list where PDFium inserts or drops characters.
    out: list[Char] = []
    left, right, bottom, top = (ctypes.c_double() for _ in range(4))
    for i in range(pdfium_c.FPDFText_CountChars(textpage)):
        code = pdfium_c.FPDFText_GetUnicode(textpage, i)
        if pdfium_c.FPDFText_IsGenerated(textpage, i) and chr(code) not in "\r\n":
            text = " "
        elif code in (0x02, 0xFFFE):
            # PDFium's mark for a word hyphenated across lines: keep the hyphen and the break.
            out.append(Char("-", None, False))
            text = "\n"
        else:
            text = chr(code) if 0 < code <= 0x10FFFF else "\ufffd"
        broken = bool(pdfium_c.FPDFText_HasUnicodeMapError(textpage, i))
        obj = pdfium_c.FPDFText_GetTextObject(textpage, i)
        invisible = bool(obj) and (pdfium_c.FPDFTextObj_GetTextRenderMode(obj)
                                   == pdfium_c.FPDF_TEXTRENDERMODE_INVISIBLE)
        box = None
        if not text.isspace() and pdfium_c.FPDFText_GetCharBox(
            textpage, i, ctypes.byref(left), ctypes.byref(right), ctypes.byref(bottom), ctypes.byref(top)
        ):
            box = (left.value, bottom.value, right.value, top.value)
        out.append(Char(text, box, broken, invisible))
    return out


class _PixelFrame:
    """PDF user space to the pixels of the page as rendered, turned `turns` quarters
    clockwise (PDFium's own transform, so /Rotate, crop boxes and odd origins land where
    the rendered pixels are)."""

    def __init__(self, page: pdfium.PdfPage, width: int, height: int, turns: int = 0) -> None:
        self.page, self.width, self.height, self.turns = page, width, height, turns

    def point(self, x: float, y: float) -> tuple[int, int]:
        dx, dy = ctypes.c_int(), ctypes.c_int()
        pdfium_c.FPDF_PageToDevice(self.page, 0, 0, self.width, self.height, self.turns, x, y,
                                   ctypes.byref(dx), ctypes.byref(dy))
        return dx.value, dy.value

    def box(self, b: tuple[float, float, float, float]) -> list[float]:
        corners = [self.point(b[0], b[1]), self.point(b[2], b[3]),
                   self.point(b[0], b[3]), self.point(b[2], b[1])]
        xs = [float(max(0, min(self.width, x))) for x, _ in corners]
        ys = [float(max(0, min(self.height, y))) for _, y in corners]
        return [min(xs), min(ys), max(xs), max(ys)]


def _lines(chars: list[Char]) -> list[list[Char]]:
    lines: list[list[Char]] = [[]]
    for char in chars:
        if char.text in "\r\n":
            if lines[-1]:
                lines.append([])
            continue
        lines[-1].append(char)
    return [line for line in lines if any(not c.text.isspace() for c in line)]


def _blocks(chars: list[Char], frame: _PixelFrame) -> list[Block]:
    lines: list[tuple[str, list[float]]] = []
    for line in _lines(chars):
        boxes = [c.box for c in line if c.box is not None]
        text = " ".join("".join(c.text for c in line).split())
        if boxes and text:
            union = (min(b[0] for b in boxes), min(b[1] for b in boxes),
                     max(b[2] for b in boxes), max(b[3] for b in boxes))
            lines.append((text, frame.box(union)))
    upward = sum(b[1][1] < a[1][1] for a, b in itertools.pairwise(lines))
    if upward > len(lines) // 2:
        # PDFium lists the lines of some turned pages bottom to top.
        lines.reverse()
    blocks: list[Block] = []
    paragraph = 0
    for n, (text, bbox) in enumerate(lines):
        if n and _starts_paragraph(lines[n - 1][1], bbox):
            paragraph += 1
        blocks.append(Block(type="text", bbox=bbox, text=text, order=n, extra={"paragraph": paragraph}))
    return blocks


def _starts_paragraph(previous: list[float], box: list[float]) -> bool:
    height = max(previous[3] - previous[1], box[3] - box[1], 1.0)
    gap = box[1] - previous[3]
    # Upwards (a new column) or a gap wider than most of a line.
    return gap > 0.8 * height or box[3] < previous[1]


def _markdown(blocks: list[Block]) -> str:
    paragraphs: list[list[str]] = []
    current = None
    for block in blocks:
        if not paragraphs or block.extra.get("paragraph") != current:
            paragraphs.append([])
            current = block.extra.get("paragraph")
        paragraphs[-1].append(block.text)
    return "\n\n".join("\n".join(p) for p in paragraphs)


def _is_broken(char: Char) -> bool:
    code = ord(char.text[0])
    return (
        char.broken
        or code == 0xFFFD
        or 0xE000 <= code <= 0xF8FF
        or code >= 0xF0000
        or unicodedata.category(char.text[0]) in ("Cc", "Cs", "Co", "Cn")
    )


def _is_plain(char: Char) -> bool:
    """Letters, digits, punctuation and the symbols of ordinary documents."""
    category = unicodedata.category(char.text[0])
    return category[0] in "LNP" or category in ("Sm", "Sc", "So", "Sk")


def _pictures(page: pdfium.PdfPage, images: list[Box], frame: _PixelFrame) -> list[Block]:
    """The page's pictures as figure blocks: not specks, and not a scan covering the page
    (that is the page itself, not a figure on it)."""
    page_area = max(page.get_width() * page.get_height(), 1.0)
    out = []
    for image in images:
        bbox = frame.box(image)
        if (_area(image) < IMAGE_PAGE_SHARE * page_area and bbox[2] - bbox[0] >= MIN_PICTURE_PIXELS
                and bbox[3] - bbox[1] >= MIN_PICTURE_PIXELS):
            out.append(Block(type="image", bbox=bbox, text=""))
    return out


def _verdict(page: pdfium.PdfPage, visible: list[Char],
             drawn: tuple[list[Box], list[Box]]) -> tuple[bool, str, dict[str, float]]:
    count = len(visible)
    stats: dict[str, float] = {"chars": count}
    if count < MIN_CHARS:
        return False, "no_text_layer" if count == 0 else "little_text", stats
    broken = sum(_is_broken(c) for c in visible) / count
    plain = sum(_is_plain(c) for c in visible) / count
    letters = [c for c in visible if c.text.isalpha()]
    latin1 = sum(0xC0 <= ord(c.text) <= 0xFF for c in letters) / max(len(letters), 1)
    stats.update(broken_share=round(broken, 3), plain_share=round(plain, 3),
                 latin1_letter_share=round(latin1, 3))
    if broken > MAX_BROKEN_SHARE or plain < MIN_PLAIN_SHARE:
        return False, "garbled", stats
    if latin1 > MAX_LATIN1_LETTER_SHARE:
        # Windows-1251 (or KOI8-R) bytes shown as Latin-1 letters: Russian with broken fonts.
        return False, "mojibake", stats
    images, paths = drawn
    page_area = max(page.get_width() * page.get_height(), 1.0)
    image_share = min(sum(_area(b) for b in images) / page_area, 1.0)
    hidden = sum(c.invisible or _on_picture(c, images) for c in visible) / count
    stats.update(image_share=round(image_share, 3), paths=len(paths), hidden_share=round(hidden, 3))
    if image_share >= IMAGE_PAGE_SHARE:
        over = _text_over(visible, images) / max(sum(_area(b) for b in images), 1.0)
        stats["text_over_images"] = round(over, 3)
        if over < MIN_TEXT_OVER_IMAGES:
            return False, "mostly_image", stats
    if len(paths) >= max(MIN_PATHS_SUSPECT, PATHS_PER_CHAR * count):
        return False, "mostly_drawing", stats
    return True, "trusted", stats


Box = tuple[float, float, float, float]


def _drawn(page: pdfium.PdfPage) -> tuple[list[Box], list[Box]]:
    """Bounds of the page's pictures and paths (top level and inside forms)."""
    images: list[Box] = []
    paths: list[Box] = []
    for obj in page.get_objects(max_depth=4):
        kind = obj.type
        if kind not in (pdfium_c.FPDF_PAGEOBJ_IMAGE, pdfium_c.FPDF_PAGEOBJ_PATH):
            continue
        try:
            bounds = obj.get_bounds()
        except pdfium.PdfiumError:
            continue
        (images if kind == pdfium_c.FPDF_PAGEOBJ_IMAGE else paths).append(tuple(bounds))
    return images, paths


def _area(box: Box) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def _on_picture(char: Char, images: list[Box]) -> bool:
    if char.box is None:
        return False
    cx = (char.box[0] + char.box[2]) / 2
    cy = (char.box[1] + char.box[3]) / 2
    return any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in images)


def _text_over(chars: list[Char], images: list[Box]) -> float:
    """The area of character boxes that lie on pictures (invisible OCR text over a scan)."""
    return sum(_area(char.box) for char in chars if char.box is not None and _on_picture(char, images))


# Blocks whose reading is the VLM's to give: structure the text layer does not have.
ENGINE_READS = {"table", "otsl", "formula", "display_formula", "inline_formula", "image", "chart", "seal",
                "header_image", "footer_image", "picture", "figure"}
BOX_SLACK = 2.0  # pixels: a line's centre on a block's edge is still in it
WHOLE_PAGE_SHARE = 0.9  # a block this big is the page: its model gave no location


def take_exact_text(read: PageResult, layer: PageResult) -> int:
    """The engine's text blocks take their text from the layer lines inside their boxes
    (the layer is exact where it is trusted; the VLM may misread a letter); each block
    records where its text came from in `text_source`. Returns how many blocks took it.
    The engine's Markdown follows, block by block.

    Each line goes to the smallest block its centre lies in; a line inside a table,
    formula or figure is theirs, and they keep the engine's reading. Blocks that span the
    whole page carry no location (a model that answers without coordinates) and keep the
    engine's reading too."""
    if read.rotation != layer.rotation or not layer.width or not layer.height:
        return 0
    sx, sy = read.width / layer.width, read.height / layer.height
    page_area = max(read.width * read.height, 1)
    located = [b for b in read.blocks if _box_area(b.bbox) < WHOLE_PAGE_SHARE * page_area]
    owned: dict[int, list[str]] = {}
    for line in layer.blocks:
        if not line.text:
            continue  # a picture of the page, not a line of text
        cx = (line.bbox[0] + line.bbox[2]) / 2 * sx
        cy = (line.bbox[1] + line.bbox[3]) / 2 * sy
        inside = [b for b in located if b.bbox[0] - BOX_SLACK <= cx <= b.bbox[2] + BOX_SLACK
                  and b.bbox[1] - BOX_SLACK <= cy <= b.bbox[3] + BOX_SLACK]
        if inside:
            owner = min(inside, key=lambda b: _box_area(b.bbox))
            owned.setdefault(id(owner), []).append(line.text)
    taken = 0
    for block in read.blocks:
        lines = owned.get(id(block))
        if block.type in ENGINE_READS or not lines:
            block.extra["text_source"] = "engine"
            continue
        old, block.text = block.text, "\n".join(lines)
        block.extra["text_source"] = "text_layer"
        taken += 1
        if old.strip() and old.strip() in read.markdown:
            read.markdown = read.markdown.replace(old.strip(), block.text, 1)
    return taken


def _box_area(bbox: list[float]) -> float:
    return max(bbox[2] - bbox[0], 0.0) * max(bbox[3] - bbox[1], 0.0)

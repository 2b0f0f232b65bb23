"""Structure a reader can use: one vocabulary of block kinds for every engine, stable ids,
reading order, heading paths across pages, and boxes that travel.

Engines name their blocks in their own words (PaddleOCR-VL's layout labels, DocTags'
tags, `text` lines from Tesseract and the text layer). A consumer gets `kind` from one
vocabulary besides them:

    title, heading (with `level`), paragraph, list_item, table, formula, figure, caption,
    code, footnote, and the page furniture: header, footer, page_number

Furniture (`furniture: true`) repeats on every page and belongs to no section: it is left
out of heading paths. `heading_path` is the chain of titles and headings above a block,
carried across pages, so that a paragraph at the top of page 7 still knows its section.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from watcher.core.pages import Block, PageResult

KINDS = ("title", "heading", "paragraph", "list_item", "table", "formula", "figure", "caption",
         "code", "footnote", "header", "footer", "page_number")
FURNITURE = {"header", "footer", "page_number"}

# Engine labels to kinds: PaddleOCR-VL's layout labels (PP-DocLayoutV2/V3), DocTags' tags,
# and `text` (Tesseract's lines, the text layer's lines).
_KIND_OF_LABEL = {
    "doc_title": "title", "title": "title",
    "paragraph_title": "heading", "section_header": "heading",
    "text": "paragraph", "paragraph": "paragraph", "content": "paragraph", "abstract": "paragraph",
    "reference": "paragraph", "reference_content": "paragraph", "aside_text": "paragraph",
    "vertical_text": "paragraph", "algorithm": "code", "code": "code",
    "list_item": "list_item", "list": "list_item",
    "table": "table", "otsl": "table",
    "formula": "formula", "display_formula": "formula", "inline_formula": "formula",
    "formula_number": "formula",
    "image": "figure", "chart": "figure", "seal": "figure", "picture": "figure", "figure": "figure",
    "header_image": "header", "footer_image": "footer",
    "figure_title": "caption", "chart_title": "caption", "table_title": "caption",
    "figure_caption": "caption", "table_caption": "caption", "caption": "caption",
    "footnote": "footnote", "vision_footnote": "footnote",
    "header": "header", "page_header": "header",
    "footer": "footer", "page_footer": "footer",
    "number": "page_number", "page_number": "page_number",
}
_SECTION_LEVEL = re.compile(r"^section_header_level_(\d+)$")
# PaddleOCR-VL titles: the document's title above its paragraph titles.
DEFAULT_HEADING_LEVEL = 2


@dataclass(frozen=True)
class Kind:
    kind: str
    level: int | None = None  # titles 1, headings 2 and deeper


def kind_of(block: Block) -> Kind:
    label = block.type.lower()
    section = _SECTION_LEVEL.match(label)
    if section:
        return Kind("heading", int(section.group(1)) + 1)
    kind = _KIND_OF_LABEL.get(label, "paragraph")
    if kind == "title":
        return Kind("title", 1)
    if kind == "heading":
        level = block.extra.get("level")
        return Kind("heading", int(level) if isinstance(level, int) and level > 1 else DEFAULT_HEADING_LEVEL)
    return Kind(kind)


def structured_blocks(pages: list[PageResult]) -> list[list[dict[str, Any]]]:
    """For each page, each block's structure fields in the result: `id`, `order`, `kind`
    (and `level`, `furniture`), `heading_path` and `bbox_norm`."""
    path: list[tuple[int, str]] = []  # (level, text) of the headings open so far
    out: list[list[dict[str, Any]]] = []
    for page in pages:
        fields: list[dict[str, Any]] = []
        for n, block in enumerate(page.blocks):
            kind = kind_of(block)
            entry: dict[str, Any] = {
                "id": f"p{page.index + 1}-b{n + 1}",
                "order": n,
                "kind": kind.kind,
                "heading_path": [text for _, text in path],
                "bbox_norm": normalised(block.bbox, page.width, page.height),
            }
            if kind.level is not None:
                entry["level"] = kind.level
            if kind.kind in FURNITURE:
                entry["furniture"] = True
            elif kind.level is not None and block.text.strip():
                entry["heading_path"] = [text for level, text in path if level < kind.level]
                path = [(level, text) for level, text in path if level < kind.level]
                path.append((kind.level, " ".join(block.text.split())))
            fields.append(entry)
        out.append(fields)
    return out


def normalised(bbox: list[float], width: int, height: int) -> list[float]:
    """A pixel box as shares of the page, 0-1, so that it lands on the original PDF page
    whatever resolution the page was read at."""
    if width <= 0 or height <= 0:
        return [0.0, 0.0, 0.0, 0.0]
    scale = (width, height, width, height)
    return [round(min(max(v / s, 0.0), 1.0), 5) for v, s in zip(bbox[:4], scale, strict=True)]

"""What a VLM answers, as page blocks: plain Markdown/text, or DocTags with locations.

With the `paddleocr-vl` preset the model answers Markdown/plain text without
coordinates, so each paragraph becomes a `text` block whose bbox is the whole page.
With `granite-docling` the answer is DocTags, whose elements carry locations on a
0..500 grid; those become blocks with real bboxes in page pixels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from watcher.core.pages import Block, PageResult


def text_page(index: int, width: int, height: int, text: str) -> PageResult:
    """Markdown/plain text without coordinates: one block per paragraph, bbox = page."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    blocks = [
        Block(type="text", bbox=[0.0, 0.0, float(width), float(height)], text=p, order=i)
        for i, p in enumerate(paragraphs)
    ]
    return PageResult(index=index, width=width, height=height, blocks=blocks,
                      markdown=text.strip(), raw={"response": text})


DOCTAGS_GRID = 500
_ELEMENT = re.compile(r"<(?P<tag>[a-z][a-z0-9_]*)>(?P<body>.*?)</(?P=tag)>", re.S)
_LOCS = re.compile(r"\s*<loc_(\d+)>\s*<loc_(\d+)>\s*<loc_(\d+)>\s*<loc_(\d+)>")
_TAG = re.compile(r"<[^>]+>")
_OTSL_TOKEN = re.compile(r"<(fcel|ecel|lcel|ucel|xcel|ched|rhed|srow|nl)>([^<]*)")
_LISTS = {"unordered_list": False, "ordered_list": True}
_FURNITURE = {"page_header", "page_footer"}


@dataclass
class _Element:
    tag: str
    bbox: list[float]
    text: str
    markdown: str
    extra: dict[str, Any]


def _bbox(body: str, width: int, height: int) -> tuple[list[float], str]:
    match = _LOCS.match(body)
    if match is None:
        return [0.0, 0.0, float(width), float(height)], body
    x0, y0, x1, y1 = (int(v) for v in match.groups())
    sx, sy = width / DOCTAGS_GRID, height / DOCTAGS_GRID
    left, right = sorted((min(x0, x1) * sx, max(x0, x1) * sx))
    top, bottom = sorted((min(y0, y1) * sy, max(y0, y1) * sy))
    left, top = max(0.0, min(left, width - 1.0)), max(0.0, min(top, height - 1.0))
    right, bottom = min(float(width), max(right, left + 1)), min(float(height), max(bottom, top + 1))
    return [round(left, 1), round(top, 1), round(right, 1), round(bottom, 1)], body[match.end():]


def _plain(fragment: str) -> str:
    return _TAG.sub("", fragment).strip()


def otsl_rows(body: str) -> tuple[list[list[str]], bool]:
    """OTSL table tokens to rows of cell text; `simple` when no cell spans another."""
    rows: list[list[str]] = []
    row: list[str] = []
    simple = True
    for token, content in _OTSL_TOKEN.findall(body):
        if token == "nl":
            rows.append(row)
            row = []
            continue
        if token in {"lcel", "ucel", "xcel"}:
            simple = False
        row.append(content.strip())
    if row:
        rows.append(row)
    rows = [r for r in rows if r]
    if rows and len({len(r) for r in rows}) != 1:
        simple = False
    return rows, simple


def _markdown_table(rows: list[list[str]]) -> str:
    cells = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + " --- |" * len(cells[0])]
    lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(lines)


def _table(bbox: list[float], body: str, width: int, height: int) -> list[_Element]:
    elements: list[_Element] = []
    captions = [m for m in _ELEMENT.finditer(body) if m.group("tag") == "caption"]
    for cap in captions:
        cap_bbox, rest = _bbox(cap.group("body"), width, height)
        elements.append(_Element("caption", cap_bbox, _plain(rest), _plain(rest), {}))
    table_body = _ELEMENT.sub(lambda m: "" if m.group("tag") == "caption" else m.group(0), body)
    rows, simple = otsl_rows(table_body)
    text = "\n".join(" ".join(c for c in r if c) for r in rows)
    rectangular = bool(rows) and len({len(r) for r in rows}) == 1
    # Spanning cells become empty cells; the raw OTSL stays in the block for exact layout.
    markdown = _markdown_table(rows) if rectangular else text
    table = _Element("otsl", bbox, text, markdown, {"otsl": table_body.strip(), "otsl_simple": simple})
    return [table, *elements]


def _element(tag: str, body: str, width: int, height: int) -> list[_Element]:
    if tag in _LISTS:
        items = []
        for n, item in enumerate(m for m in _ELEMENT.finditer(body) if m.group("tag") == "list_item"):
            bbox, rest = _bbox(item.group("body"), width, height)
            text = _plain(rest)
            bullet = f"{n + 1}." if _LISTS[tag] else "-"
            items.append(_Element("list_item", bbox, text, f"{bullet} {text}", {"list": tag}))
        return items
    bbox, rest = _bbox(body, width, height)
    if tag == "otsl":
        return _table(bbox, rest, width, height)
    if tag in {"picture", "chart"}:
        inner = [m for m in _ELEMENT.finditer(rest) if m.group("tag") == "caption"]
        out = [_Element(tag, bbox, "", "", {})]
        for cap in inner:
            cap_bbox, cap_rest = _bbox(cap.group("body"), width, height)
            out.append(_Element("caption", cap_bbox, _plain(cap_rest), _plain(cap_rest), {}))
        return out
    if tag == "code":
        lang = re.match(r"\s*<_([^>]*)_>", rest)
        code = _plain(rest)
        extra = {"language": lang.group(1)} if lang else {}
        return [_Element(tag, bbox, code, f"```{extra.get('language', '').lower()}\n{code}\n```", extra)]
    text = _plain(rest)
    if tag == "formula":
        return [_Element(tag, bbox, text, f"$$\n{text}\n$$", {"latex": text})]
    if tag == "title":
        return [_Element(tag, bbox, text, f"# {text}", {})]
    level = re.fullmatch(r"section_header_level_(\d+)", tag)
    if level:
        hashes = "#" * min(6, int(level.group(1)) + 1)
        return [_Element(tag, bbox, text, f"{hashes} {text}", {})]
    # Running headers and footers are kept as blocks but left out of the reading text.
    return [_Element(tag, bbox, text, "" if tag in _FURNITURE else text, {})]


def parse_doctags(text: str, width: int, height: int) -> tuple[list[Block], str]:
    """DocTags (granite-docling / SmolDocling) to blocks in page pixels and Markdown."""
    body = text.strip()
    wrapper = re.fullmatch(r"\s*<doctag>(.*?)(</doctag>)?\s*", body, re.S)
    if wrapper:
        body = wrapper.group(1)
    elements: list[_Element] = []
    for match in _ELEMENT.finditer(body):
        elements.extend(_element(match.group("tag"), match.group("body"), width, height))
    blocks = [
        Block(type=e.tag, bbox=e.bbox, text=e.text, order=i, extra=e.extra)
        for i, e in enumerate(elements)
    ]
    parts: list[str] = []
    previous: _Element | None = None
    for e in elements:
        if not e.markdown:
            continue
        # Consecutive items of one list form one Markdown list, not separate paragraphs.
        if previous is not None and e.tag == previous.tag == "list_item" and e.extra == previous.extra:
            parts[-1] += "\n" + e.markdown
        else:
            parts.append(e.markdown)
        previous = e
    return blocks, "\n\n".join(parts)


def doctags_page(index: int, width: int, height: int, text: str) -> PageResult:
    blocks, markdown = parse_doctags(text, width, height)
    if not blocks and text.strip():
        # Not DocTags after all (a prompt override, a different model): keep the text.
        return text_page(index, width, height, _plain(text) or text)
    return PageResult(index=index, width=width, height=height, blocks=blocks,
                      markdown=markdown, raw={"response": text})

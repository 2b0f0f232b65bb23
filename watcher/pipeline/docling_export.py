"""The result as a Docling document: `DoclingDocument` JSON, built with docling-core's own
types, so that Docling's chunkers and serializers work on our output.

docling-core is an optional extra (`pip install '.[docling]'`): it brings pandas. It is
imported only when WATCHER_OUTPUTS names `docling`, and the daemon refuses to start with
that setting where it is missing.

The mapping, from the result's `kind` vocabulary (pipeline/structure.py): title, heading
(section header one level below our `level`, since our titles are level 1), paragraph
(text), list_item (in a list group per run of items), table (its HTML cells when the
engine gave them, else one cell), formula (its LaTeX), figure (a picture), caption,
code, footnote; headers, footers and page numbers go to the furniture layer. Pages are
sized in PDF points and boxes are converted to points from the page's `dpi` (pixels when
it is unknown), top-left origin, each with its page and character span as provenance.
"""

from __future__ import annotations

import html
import re
from typing import Any

_ROW = re.compile(r"<tr\b[^>]*>(.*?)</tr\s*>", re.I | re.S)
_CELL = re.compile(r"<t([dh])\b([^>]*)>(.*?)</t[dh]\s*>", re.I | re.S)
_SPAN = re.compile(r'(row|col)span\s*=\s*"?(\d+)', re.I)
_TAG = re.compile(r"<[^>]+>")


def docling_json(result: dict[str, Any]) -> bytes:
    return str(docling_document(result).model_dump_json()).encode("utf-8")


def docling_document(result: dict[str, Any]) -> Any:
    from docling_core.types.doc import DocItemLabel, DoclingDocument, GroupLabel, Size

    name = str(result.get("source", {}).get("key", "document")).rsplit("/", 1)[-1]
    doc = DoclingDocument(name=name)
    for page in result.get("pages", []):
        scale = 72.0 / float(page["dpi"]) if page.get("dpi") else 1.0
        size = Size(width=max(page["width"] * scale, 1.0), height=max(page["height"] * scale, 1.0))
        doc.add_page(page_no=page["index"] + 1, size=size)
        group = None
        for block in page.get("blocks", []):
            kind = block.get("kind", "paragraph")
            if kind != "list_item":
                group = None
            elif group is None:
                group = doc.add_group(label=GroupLabel.LIST)
            _add(doc, block, kind, _provenance(page, block, scale), group, DocItemLabel)
    return doc


def _provenance(page: dict[str, Any], block: dict[str, Any], scale: float) -> Any:
    from docling_core.types.doc import BoundingBox, CoordOrigin, ProvenanceItem

    x0, y0, x1, y1 = (float(v) * scale for v in block["bbox"])
    return ProvenanceItem(page_no=page["index"] + 1,
                          bbox=BoundingBox(l=x0, t=y0, r=x1, b=y1, coord_origin=CoordOrigin.TOPLEFT),
                          charspan=(0, len(block.get("text") or "")))


def _add(doc: Any, block: dict[str, Any], kind: str, prov: Any, group: Any, labels: Any) -> None:
    from docling_core.types.doc import ContentLayer

    text = str(block.get("text") or "")
    if kind == "title":
        doc.add_title(text, prov=prov)
    elif kind == "heading":
        doc.add_heading(text, level=max(1, int(block.get("level", 2)) - 1), prov=prov)
    elif kind == "list_item":
        doc.add_list_item(text, parent=group, prov=prov)
    elif kind == "table":
        doc.add_table(data=_table(block), prov=prov)
    elif kind == "formula":
        doc.add_formula(str(block.get("latex") or text), prov=prov)
    elif kind == "figure":
        doc.add_picture(prov=prov)
    elif kind == "code":
        doc.add_code(text, prov=prov)
    elif kind in ("header", "footer", "page_number"):
        label = labels.PAGE_HEADER if kind == "header" else labels.PAGE_FOOTER
        doc.add_text(label=label, text=text, prov=prov, content_layer=ContentLayer.FURNITURE)
    else:
        label = {"caption": labels.CAPTION, "footnote": labels.FOOTNOTE}.get(kind, labels.TEXT)
        doc.add_text(label=label, text=text, prov=prov)


def _table(block: dict[str, Any]) -> Any:
    """The block's HTML table as docling-core's TableData (spans kept); one cell holding
    the text when the engine gave no HTML."""
    from docling_core.types.doc import TableCell, TableData

    rows = _ROW.findall(str(block.get("html") or ""))
    cells: list[Any] = []
    taken: set[tuple[int, int]] = set()
    for r, row in enumerate(rows):
        c = 0
        for head, attrs, content in _CELL.findall(row):
            while (r, c) in taken:
                c += 1
            spans = {kind.lower(): int(n) for kind, n in _SPAN.findall(attrs)}
            rs, cs = max(1, spans.get("row", 1)), max(1, spans.get("col", 1))
            taken.update((r + i, c + j) for i in range(rs) for j in range(cs))
            cells.append(TableCell(text=html.unescape(_TAG.sub("", content)).strip(),
                                   row_span=rs, col_span=cs, start_row_offset_idx=r,
                                   end_row_offset_idx=r + rs, start_col_offset_idx=c,
                                   end_col_offset_idx=c + cs, column_header=head.lower() == "h"))
            c += cs
    if not cells:
        cells = [TableCell(text=str(block.get("text") or ""), start_row_offset_idx=0, end_row_offset_idx=1,
                           start_col_offset_idx=0, end_col_offset_idx=1)]
    rows_n = max(cell.end_row_offset_idx for cell in cells)
    cols_n = max(cell.end_col_offset_idx for cell in cells)
    return TableData(num_rows=rows_n, num_cols=cols_n, table_cells=cells)

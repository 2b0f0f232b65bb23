"""Repair: a PDF that PDFium cannot open, or finds no pages in, rewritten so that it can.

Browsers open many PDFs that PDFium gives up on: pdf.js rebuilds a damaged cross-reference
table and, when the page tree is lost, looks for the page objects themselves. Two repairs,
tried in this order, each checked by opening the result with PDFium again:

1. qpdf (through pikepdf, whose wheels bundle it) reads the file with its own recovery
   (it reconstructs the cross-reference table by scanning the objects) and writes it anew,
   with a clean page tree.
2. When even qpdf finds no page tree (the catalog points at nothing), an incremental
   update is appended that gives the file a new catalog: over the page tree node still in
   the file, or over a new one that lists every page object found in it.

The repaired copy is written beside the original, in the document's work directory. An
encrypted PDF is never "repaired": its password error stays what it is.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from watcher.core.logs import get_logger

log = get_logger("watcher.pipeline.repair")

_OBJECT = re.compile(rb"(\d+)\s+(\d+)\s+obj\b(.*?)endobj", re.S)
_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")
_PAGES = re.compile(rb"/Type\s*/Pages\b")
_MEDIABOX = re.compile(rb"/MediaBox\s*\[[^\]]*\]")
_STARTXREF = re.compile(rb"startxref\s+(\d+)")
DEFAULT_MEDIABOX = b"/MediaBox [0 0 595 842]"  # A4, for pages that inherited theirs from a lost node


def with_qpdf(path: Path) -> Path | None:
    """`path` read and rewritten by qpdf; None when qpdf cannot read it either."""
    import pikepdf  # heavy; only for damaged files

    target = path.with_name(path.name + ".qpdf.pdf")
    try:
        with pikepdf.open(path) as pdf:
            if len(pdf.pages) == 0:
                return None
            pdf.save(target)
    except pikepdf.PasswordError:
        return None
    except Exception as exc:  # qpdf's errors are PdfError, but a damaged file can raise anything
        reason = str(exc).replace(str(path), path.name)  # no local paths in logs
        log.info("qpdf_repair_failed", error=f"{type(exc).__name__}: {reason}"[:300])
        return None
    return target


def with_new_catalog(path: Path) -> Path | None:
    """`path` with a catalog appended over its page tree (or over its page objects); None
    when it holds no page objects at all."""
    data = path.read_bytes()
    objects = {int(m.group(1)): m.group(3) for m in _OBJECT.finditer(data)}
    if not objects:
        return None
    next_num = max(objects) + 1
    trees = [num for num, body in objects.items() if _PAGES.search(body)]
    roots = [num for num in trees if b"/Parent" not in objects[num]]
    appended: list[bytes] = []
    if roots:
        pages_num = roots[-1]
    else:
        pages = [num for num, body in objects.items() if _PAGE.search(body)]
        if not pages:
            return None
        boxes = Counter(m.group(0) for body in objects.values() for m in _MEDIABOX.finditer(body))
        box = boxes.most_common(1)[0][0] if boxes else DEFAULT_MEDIABOX
        kids = b" ".join(b"%d 0 R" % num for num in pages)
        pages_num, next_num = next_num, next_num + 1
        appended.append(b"<< /Type /Pages /Kids [%s] /Count %d %s >>" % (kids, len(pages), box))
    catalog_num = next_num
    appended.append(b"<< /Type /Catalog /Pages %d 0 R >>" % pages_num)
    first = catalog_num - len(appended) + 1
    out = bytearray(data if data.endswith(b"\n") else data + b"\n")
    offsets = []
    for n, body in enumerate(appended):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (first + n, body)
    xref_at = len(out)
    out += b"xref\n0 1\n0000000000 65535 f \n%d %d\n" % (first, len(appended))
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    previous = _STARTXREF.findall(data)
    prev = b" /Prev %s" % previous[-1] if previous else b""
    out += b"trailer\n<< /Size %d /Root %d 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (
        catalog_num + 1, catalog_num, prev, xref_at)
    target = path.with_name(path.name + ".catalog.pdf")
    target.write_bytes(bytes(out))
    return target

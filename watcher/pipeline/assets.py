"""Figures beside the Markdown: the blocks of kind `figure` (a VLM's image, chart, seal or
picture; a born-digital page's pictures from its text layer; the image regions of
Tesseract's layout analysis), cropped from the page at the resolution it was read at and
written under
`<result name>.assets/` (`page-3-figure-1.png`), so that a Markdown viewer opened on the
output prefix shows them.

The engines do not keep page bitmaps (a VLM engine has hundreds of pages waiting on the
server as PNGs), so a page with figures is rendered once more, in the decode workers,
after it was read; pages without figures cost nothing. WATCHER_ASSETS turns this off;
WATCHER_ASSETS_MAX_MB bounds one document's assets, and figures past it are left out with
an `assets_limited` warning.
"""

from __future__ import annotations

import asyncio
import io
from urllib.parse import quote

from PIL import Image

from watcher.core.errors import DocumentError
from watcher.core.logs import get_logger
from watcher.core.pages import Block, PageResult
from watcher.core.settings import MiB
from watcher.pipeline.decode import Decoder, Document
from watcher.pipeline.structure import kind_of

log = get_logger("watcher.pipeline.assets")

MIN_SIDE = 8  # pixels: smaller "figures" are specks, not pictures


def figures(page: PageResult) -> list[Block]:
    return [b for b in page.blocks if kind_of(b).kind == "figure"]


async def crop_figures(decoder: Decoder, doc: Document, pages: list[PageResult],
                       max_bytes: int) -> dict[str, bytes]:
    """`{name: PNG}` for the figures of `pages`; each figure block gets `asset` (its name)."""
    assets: dict[str, bytes] = {}
    total = 0
    for page in pages:
        wanted = figures(page)
        if not wanted or page.error is not None or page.rotation:
            continue
        try:
            rendered = await decoder.render(doc, page.index)
        except DocumentError as exc:
            log.warning("assets_not_rendered", page=page.index, error=exc.message)
            continue
        crops = await asyncio.to_thread(_crops, rendered.image, page, wanted)
        for n, (block, png) in enumerate(crops, start=1):
            if total + len(png) > max_bytes:
                page.warnings.append({"code": "assets_limited", "message": (
                    f"page {page.index + 1}: figures past {max_bytes // MiB} MB of this document's "
                    "assets (WATCHER_ASSETS_MAX_MB) are not written")})
                return assets
            name = f"page-{page.index + 1}-figure-{n}.png"
            block.extra["asset"] = name
            assets[name] = png
            total += len(png)
    return assets


def _crops(image: Image.Image, page: PageResult, blocks: list[Block]) -> list[tuple[Block, bytes]]:
    sx, sy = image.width / max(page.width, 1), image.height / max(page.height, 1)
    out = []
    for block in blocks:
        x0, y0, x1, y1 = block.bbox
        box = (max(0, round(x0 * sx)), max(0, round(y0 * sy)),
               min(image.width, round(x1 * sx)), min(image.height, round(y1 * sy)))
        if box[2] - box[0] < MIN_SIDE or box[3] - box[1] < MIN_SIDE:
            continue
        with io.BytesIO() as buf:
            image.crop(box).save(buf, format="PNG", optimize=True)
            out.append((block, buf.getvalue()))
    return out


def linked(markdown: str, blocks: list[Block]) -> str:
    """The page's Markdown with a link to each figure's asset (its path from the result),
    after the text of the block before it (where the figure stands in reading order), or
    at the end."""
    for n, block in enumerate(blocks):
        path = block.extra.get("asset")
        if not path:
            continue
        link = f"![{_alt(block)}]({quote(str(path))})"
        before = next((b.text.strip() for b in reversed(blocks[:n])
                       if b.text.strip() and b.text.strip() in markdown), None)
        if before is None:
            markdown = f"{markdown.rstrip()}\n\n{link}" if markdown.strip() else link
        else:
            at = markdown.index(before) + len(before)
            markdown = f"{markdown[:at]}\n\n{link}\n\n{markdown[at:].lstrip()}".rstrip()
    return markdown


def _alt(block: Block) -> str:
    text = " ".join(block.text.split())[:80].replace("]", ")").replace("[", "(")
    return text or "figure"

"""The page types every stage shares: a rendered page going in, a page's reading coming out.

They live on the ground floor so that the decoder, the text layer, the engines, the
result and the checkpoints speak of the same page without importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from PIL import Image


@dataclass
class RenderedPage:
    """One page as pixels, ready for an engine."""

    index: int
    image: Image.Image  # RGB
    width: int
    height: int
    # [{"code", "message"}]: what the decoder reported while making this image.
    warnings: list[dict[str, str]] = field(default_factory=list)
    # Pixels per inch of the page as drawn (a PDF page's render scale; an image's own
    # resolution when it says one); None when unknown.
    dpi: float | None = None


@dataclass
class Block:
    """One layout element on a page, in page pixel coordinates."""

    type: str
    bbox: list[float]  # [x0, y0, x1, y1]
    text: str
    score: float | None = None
    order: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class TextSource(StrEnum):
    OCR = "ocr"
    TEXT_LAYER = "text_layer"


@dataclass
class PageResult:
    """One page's reading. `width`/`height` are the pixels the block boxes refer to, after
    `rotation` (degrees counter-clockwise that turned the page upright)."""

    index: int
    width: int
    height: int
    blocks: list[Block]
    markdown: str
    raw: dict[str, Any] | None = None
    text_source: str = TextSource.OCR.value
    rotation: int = 0
    # A page that could not be rendered or read: {"code", "message"}; the others keep
    # their text.
    error: dict[str, str] | None = None
    # [{"code", "message"}]: damage the decoder reported, no text found, and so on.
    warnings: list[dict[str, str]] = field(default_factory=list)
    # The resolution the boxes' pixels are at (RenderedPage.dpi); None when unknown.
    dpi: float | None = None

    @property
    def text(self) -> str:
        return " ".join(b.text for b in self.blocks if b.text)


def with_figures(blocks: list[Block], figures: list[Block]) -> list[Block]:
    """`blocks` (in reading order) with `figures` put where they stand: each before the
    first block that starts below its top. `order` follows the new sequence."""
    out = list(blocks)
    for figure in sorted(figures, key=lambda b: b.bbox[1]):
        at = next((n for n, b in enumerate(out) if b.bbox[1] > figure.bbox[1]), len(out))
        out.insert(at, figure)
    for n, block in enumerate(out):
        block.order = n
    return out

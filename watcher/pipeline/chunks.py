"""Chunks: a result cut into the pieces vector databases and RAG loaders ingest.

With WATCHER_CHUNKS on, each result gets `<result key minus .json>.chunks.jsonl` beside it,
one JSON object per line. A chunk is consecutive blocks of one section, at most
WATCHER_CHUNK_TOKENS tokens. It never crosses a heading (a title or heading starts the
next chunk, and is carried in `heading_path` rather than repeated in the text), never
splits a table (a table is a chunk of its own, whatever its size), and leaves out page
furniture (headers, footers, page numbers). Each line:

    {"id": "c3", "text": "...", "contextualized_text": "Договор > 1. Предмет\\n\\n...",
     "heading_path": ["Договор", "1. Предмет"], "pages": [0, 1], "tokens": 212,
     "block_ids": ["p1-b4", "p2-b1"], "boxes": [{"page": 0, "bbox_norm": [...]}, ...]}

`contextualized_text` (the heading path, then the text) is what to embed; `text` is what
to show. Tokens are counted as words and punctuation marks (`\\w+|[^\\w\\s]`), which is
close to what subword tokenizers give for Russian and English prose and never less.
Chunks are made from the result JSON alone, so a result re-pointed at a new version of
the same bytes gets its chunks again without reading the document.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_TOKEN = re.compile(r"\w+|[^\w\s]")
SECTION_KINDS = {"title", "heading"}


def tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


@dataclass
class _Chunk:
    heading_path: list[str]
    table: bool = False
    texts: list[str] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    tokens: int = 0

    def add(self, page: int, block: dict[str, Any], text: str, count: int) -> None:
        self.texts.append(text)
        self.blocks.append({"id": block.get("id"), "page": page, "bbox_norm": block.get("bbox_norm")})
        if page not in self.pages:
            self.pages.append(page)
        self.tokens += count


def chunks_of(result: dict[str, Any], max_tokens: int) -> list[dict[str, Any]]:
    """The result's chunks, in reading order."""
    done: list[_Chunk] = []
    current: _Chunk | None = None
    for page in result.get("pages", []):
        for block in page.get("blocks", []):
            kind = block.get("kind", "paragraph")
            text = str(block.get("text") or "").strip()
            if block.get("furniture") or not text:
                continue
            if kind in SECTION_KINDS:
                _flush(done, current)
                current = None
                continue
            count = tokens(text)
            path = list(block.get("heading_path") or [])
            table = kind == "table"
            if current is not None and (current.heading_path != path or table or current.table
                                        or current.tokens + count > max_tokens):
                _flush(done, current)
                current = None
            if current is None:
                current = _Chunk(path, table=table)
            current.add(int(page.get("index", 0)), block, text, count)
    _flush(done, current)
    return [_as_json(n, chunk) for n, chunk in enumerate(done, start=1)]


def _flush(done: list[_Chunk], chunk: _Chunk | None) -> None:
    if chunk is not None and chunk.texts:
        done.append(chunk)


def _as_json(n: int, chunk: _Chunk) -> dict[str, Any]:
    text = "\n\n".join(chunk.texts)
    context = " > ".join(chunk.heading_path)
    return {
        "id": f"c{n}",
        "text": text,
        "contextualized_text": f"{context}\n\n{text}" if context else text,
        "heading_path": chunk.heading_path,
        "pages": chunk.pages,
        "tokens": chunk.tokens,
        "block_ids": [b["id"] for b in chunk.blocks],
        "boxes": [{"page": b["page"], "bbox_norm": b["bbox_norm"]} for b in chunk.blocks],
    }


def to_jsonl(chunks: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chunks).encode("utf-8")

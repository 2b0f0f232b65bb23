"""What is written beside each result besides its JSON and Markdown: chunks
(WATCHER_CHUNKS) and the Docling document (WATCHER_OUTPUTS=docling). Each is made from the
result JSON alone, written in the result's commit before the JSON, and removed with it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from watcher.bucket.names import CHUNKS_SUFFIX, DOCLING_SUFFIX
from watcher.core.settings import Settings
from watcher.pipeline.chunks import chunks_of, to_jsonl
from watcher.pipeline.docling_export import docling_json

JSONL = "application/jsonl; charset=utf-8"
JSON = "application/json; charset=utf-8"


@dataclass(frozen=True)
class Output:
    suffix: str
    content_type: str
    build: Callable[[dict[str, Any]], bytes]


def outputs_of(settings: Settings) -> tuple[Output, ...]:
    outputs = []
    if settings.chunks:
        outputs.append(Output(CHUNKS_SUFFIX, JSONL, partial(_chunks, max_tokens=settings.chunk_tokens)))
    if "docling" in settings.output_formats():
        outputs.append(Output(DOCLING_SUFFIX, JSON, docling_json))
    return tuple(outputs)


def build_outputs(outputs: tuple[Output, ...], result: dict[str, Any]) -> dict[str, bytes]:
    return {output.suffix: output.build(result) for output in outputs}


def _chunks(result: dict[str, Any], max_tokens: int) -> bytes:
    return to_jsonl(chunks_of(result, max_tokens))

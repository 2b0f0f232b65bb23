"""Render: the result JSON (schema `watcher.result/2`), its Markdown, and error records."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from watcher import __version__
from watcher.core.errors import ErrorCode, scrub
from watcher.core.pages import PageResult
from watcher.core.refs import ObjectRef
from watcher.pipeline.assets import figures, linked
from watcher.pipeline.outputs import Output, build_outputs
from watcher.pipeline.structure import structured_blocks

SCHEMA_VERSION = "2.0"
ERROR_SCHEMA_VERSION = "1.1"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def source_fields(ref: ObjectRef) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "bucket": ref.bucket,
        "key": ref.key,
        "etag": ref.etag,
        "size": ref.size,
        "last_modified": ref.last_modified.isoformat() if ref.last_modified else None,
    }
    if ref.sha256:
        fields["sha256"] = ref.sha256
    return fields


def _block(block: Any, structure: dict[str, Any]) -> dict[str, Any]:
    data = asdict(block)
    extra = data.pop("extra") or {}
    data.update(extra)
    data.update(structure)
    return {k: v for k, v in data.items() if v is not None}


def markdown_of(pages: list[PageResult]) -> str:
    """Pages in order, each introduced by an HTML comment that Markdown viewers hide."""
    parts = [f"<!-- page {p.index + 1}{_not_read(p)} -->\n\n{p.markdown.strip()}".rstrip()
             for p in pages]
    return "\n\n".join(parts) + "\n"


def _not_read(page: PageResult) -> str:
    if page.error is None:
        return ""
    # `--` may not appear inside an HTML comment.
    return f": not read ({page.error['code']}: {page.error['message'].replace('--', '-')})"


def result_of(
    ref: ObjectRef,
    engine: dict[str, str],
    doc_format: str,
    pages: list[PageResult],
    markdown: str,
    timings: dict[str, float],
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "source": source_fields(ref),
        "engine": engine,
        "document": {"format": doc_format, "page_count": len(pages)},
        "pages": [],
        "warnings": [{**w, "page": p.index} for p in pages for w in p.warnings],
        "markdown": markdown,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "created_at": now(),
        "watcher_version": __version__,
    }
    for page, structure in zip(pages, structured_blocks(pages), strict=True):
        entry: dict[str, Any] = {
            "index": page.index,
            "width": page.width,
            "height": page.height,
            "dpi": page.dpi,
            "blocks": [_block(b, s) for b, s in zip(page.blocks, structure, strict=True)],
            "markdown": page.markdown,
            "text_source": page.text_source,
            "rotation": page.rotation,
        }
        if page.error is not None:
            entry["error"] = page.error
        if page.raw is not None:
            entry["raw"] = page.raw
        result["pages"].append(entry)
    return result


def error_record(ref: ObjectRef, code: ErrorCode, message: str, attempts: int) -> dict[str, Any]:
    return {
        "schema_version": ERROR_SCHEMA_VERSION,
        "source": source_fields(ref),
        "error": {"code": code.value, "message": scrub(message), "attempts": attempts},
        "created_at": now(),
        "watcher_version": __version__,
    }


def to_json_bytes(data: dict[str, Any]) -> bytes:
    # Documents are often Russian: keep UTF-8 readable, not \u-escaped.
    return json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8")


def timings_of(seconds: dict[str, float]) -> dict[str, float]:
    """The result's `timings` from a run's stage times (`StageTimer.seconds`): the names
    results have always carried. Sums over pages can exceed the document's wall time."""
    names = {"fetch": "fetch_seconds", "decode": "decode_seconds_sum",
             "engine": "engine_seconds_sum", "recognise": "recognise_seconds"}
    return {names[stage]: value for stage, value in seconds.items() if stage in names}


def build_result(
    ref: ObjectRef,
    engine: dict[str, str],
    doc_format: str,
    pages: list[PageResult],
    seconds: dict[str, float],
    outputs: tuple[Output, ...] = (),
    asset_folder: str = "",
) -> tuple[bytes, bytes, dict[str, bytes]]:
    """Markdown, result JSON and the `outputs` beside it, encoded; CPU-bound for long
    documents, so run off the loop. `render_seconds` is the time taken to put the Markdown
    together. Figure blocks with an asset (assets.py) are linked from the Markdown, and
    their `asset` is its path from the result, in `asset_folder`."""
    started = time.perf_counter()
    for page in pages:
        for block in figures(page):
            if block.extra.get("asset"):
                block.extra["asset"] = f"{asset_folder}/{block.extra['asset']}"
        page.markdown = linked(page.markdown, page.blocks)
    markdown = markdown_of(pages)
    timings = {**timings_of(seconds), "render_seconds": time.perf_counter() - started}
    result = result_of(ref, engine, doc_format, pages, markdown, timings)
    return markdown.encode("utf-8"), to_json_bytes(result), build_outputs(outputs, result)


def _schema(name: str) -> dict[str, Any]:
    """A JSON Schema shipped in the package (`watcher/schema/<name>`)."""
    from importlib.resources import files

    schema: dict[str, Any] = json.loads((files("watcher") / "schema" / name).read_text(encoding="utf-8"))
    return schema


def _type_of(node: dict[str, Any]) -> str:
    """A property's JSON type in words: `string or null`, `array of number`, enum values."""
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "enum" in node:
        return ", ".join(f"`{v}`" if isinstance(v, str) else f"`{json.dumps(v)}`" for v in node["enum"])
    kinds = node.get("type")
    if kinds is None:
        return "any"
    if isinstance(kinds, list):
        return " or ".join(kinds)
    if kinds == "array" and isinstance(node.get("items"), dict):
        return f"array of {_type_of(node['items'])}"
    if kinds == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"object of {_type_of(node['additionalProperties'])}"
    return str(kinds)


def _fields(node: dict[str, Any], prefix: str) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    for key, prop in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        rows.append((path, _type_of(prop), " ".join(str(prop.get("description", "")).split())))
        rows += _fields(prop, f"{path}.")
        items = prop.get("items")
        if isinstance(items, dict):
            rows += _fields(items, f"{path}[].")
    return rows


def schema_fields(name: str) -> list[tuple[str, str, str]]:
    """Every property of the packaged schema `name` (`result-v2.json`), depth first in the
    schema's order: its path (`pages[].blocks[].score`), JSON type and description."""
    return _fields(_schema(name), "")


def fields_table(name: str) -> str:
    """The README's table of the fields of schema `name`, generated from the schema."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| Field | Type | Meaning |", "|---|---|---|"]
    lines += [f"| `{cell(path)}` | {cell(kind)} | {cell(text)} |" for path, kind, text in schema_fields(name)]
    return "\n".join(lines) + "\n"

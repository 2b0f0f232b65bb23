"""The README's result JSON and error record, held to the schemas and to real records.

The field tables in the README are generated from the schemas (`fields_table`); the
examples must parse, validate and carry the current schema versions; and real records,
made by the daemon's own pipeline over an in-memory S3 with the real CPU engine (about a
second of OCR), must have no field the README's examples lack, and none the schemas do
not describe.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import rudocs
from docgen import page_image
from memory_s3 import MemoryS3

from watcher.bucket.storage import Storage
from watcher.core.errors import ErrorCode
from watcher.core.metrics import Metrics
from watcher.core.refs import ObjectRef
from watcher.core.settings import load_settings
from watcher.engines.cpu import CpuEngine
from watcher.pipeline.decode import not_a_document
from watcher.pipeline.document import DocumentPipeline
from watcher.pipeline.result import ERROR_SCHEMA_VERSION, SCHEMA_VERSION, fields_table

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
SCHEMAS = {name: json.loads((ROOT / "watcher/schema" / name).read_text(encoding="utf-8"))
           for name in ("result-v2.json", "error-v1.json")}
BUCKET = "documents"
NOTES = b"Meeting notes, 24 November\nAgenda: the supply contract\n"


def section(heading: str) -> str:
    """The README's text under the `### <heading>...` line, up to the next heading."""
    found = re.search(rf"^### {re.escape(heading)}.*?$(.*?)(?=^#)", README, re.M | re.S)
    assert found is not None, f"README has no '### {heading}' section"
    return found.group(1)


def example(heading: str) -> dict[str, Any]:
    """The one ```json block under the README's `heading`, parsed."""
    blocks = re.findall(r"^```json\n(.*?)^```", section(heading), re.M | re.S)
    assert len(blocks) == 1, f"expected one ```json block under '### {heading}', found {len(blocks)}"
    data: dict[str, Any] = json.loads(blocks[0])
    return data


RESULT_EXAMPLE = "Result JSON"
ERROR_EXAMPLE = "Error records"


# --- (a) the README's tables are the generated ones ------------------------------------
@pytest.mark.parametrize("name", ["result-v2.json", "error-v1.json"])
def test_the_readme_carries_the_generated_field_table(name: str) -> None:
    assert fields_table(name) in README, (
        f"README.md lacks the table of {name}'s fields or it is stale: regenerate with "
        f'watcher.pipeline.result.fields_table("{name}") and paste it in')


# --- (b) every property is described ---------------------------------------------------
def properties(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every property under `node`, at any depth (objects, array items), with its path."""
    if not isinstance(node, dict):
        return
    for key, prop in node.get("properties", {}).items():
        yield f"{path}{key}", prop
        yield from properties(prop, f"{path}{key}.")
    for key in ("items", "additionalProperties"):
        yield from properties(node.get(key), f"{path.rstrip('.')}[]." if key == "items" else path)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_property_of_the_schemas_is_described(name: str) -> None:
    found = list(properties(SCHEMAS[name]))
    assert len(found) > 5
    bare = [path for path, prop in found
            if not isinstance(prop.get("description"), str) or not prop["description"].strip()]
    assert bare == [], f"{name}: properties without a description: {bare}"


# --- (c) the README's examples are valid records ---------------------------------------
@pytest.mark.parametrize(("heading", "name", "version"), [
    (RESULT_EXAMPLE, "result-v2.json", SCHEMA_VERSION),
    (ERROR_EXAMPLE, "error-v1.json", ERROR_SCHEMA_VERSION),
])
def test_the_readme_examples_validate_at_the_current_version(heading: str, name: str, version: str) -> None:
    record = example(heading)
    jsonschema.Draft202012Validator(SCHEMAS[name]).validate(record)
    assert record["schema_version"] == version


# --- (d) held to real records ------------------------------------------------------------
def scan_pdf() -> bytes:
    """A one-page image-only PDF: no text layer, so the engine reads it."""
    return rudocs.scan_pdf([page_image(["INVOICE 2041", "Total due: 1 250,00 EUR"], (1240, 1754))],
                           dpi=150)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Records the daemon's pipeline writes, by source name: `layer.pdf` (a text-layer page
    and a page that cannot be loaded), `scan.pdf` (a page the CPU engine reads), `notes.pdf`
    (a text file named .pdf) and `flat.pdf` (one page without height)."""
    sources = {
        "layer.pdf": rudocs.pdf_with_broken_page(rudocs.RUSSIAN_TEXT[0][:6]),
        "scan.pdf": scan_pdf(),
        "notes.pdf": NOTES,
        "flat.pdf": rudocs.zero_area_pdf(),
    }
    settings = load_settings(s3_endpoint="http://memory.invalid", s3_bucket=BUCKET, s3_access_key="t:k",
                             s3_secret_key="s", lease_seconds=30)

    async def main() -> dict[str, dict[str, Any]]:
        store = MemoryS3()
        engine = CpuEngine()
        storage = Storage(store.client("watcher"), BUCKET, 3)
        pipeline = DocumentPipeline.reading_with(engine, settings, storage, Metrics(),
                                                 work_dir=tmp_path_factory.mktemp("work"))
        try:
            for name, body in sources.items():
                etag = store.put(f"input/{name}", body)
                await pipeline.process(ObjectRef(BUCKET, f"input/{name}", etag, len(body),
                                                 last_modified=datetime.now(UTC)))
        finally:
            await pipeline.close()
            await engine.close()
        records = {}
        for name in sources:
            for key in (f"output/{name}.json", f"output/{name}.error.json"):
                if key in store.objects:
                    records[name] = json.loads(store.objects[key].body)
        return records

    records = asyncio.run(main())
    assert sorted(records) == sorted(sources)
    return records


def lacking(example_part: dict[str, Any], real_part: dict[str, Any], where: str) -> list[str]:
    return [f"{where}.{key}" for key in real_part if key not in example_part]


def test_the_readme_result_shows_every_field_real_results_have(real: dict[str, dict[str, Any]]) -> None:
    shown = example(RESULT_EXAMPLE)
    results = [real["layer.pdf"], real["scan.pdf"]]
    assert [r["schema_version"] for r in results] == [SCHEMA_VERSION] * 2
    missing: list[str] = []
    for result in results:
        missing += lacking(shown, result, "result")
        for part in ("source", "engine", "document", "timings"):
            missing += lacking(shown[part], result[part], part)
        for warning in result["warnings"]:
            missing += lacking(shown["warnings"][0], warning, "warnings[]")
    # Each sort of page a real result has (text layer, OCR, in error) is shown, with all its fields.
    pages = [*real["layer.pdf"]["pages"], *real["scan.pdf"]["pages"]]
    sorts = {(p["text_source"], "error" in p) for p in pages}
    assert sorts == {("text_layer", False), ("ocr", False), ("ocr", True)}, sorts
    for page in pages:
        sort = (page["text_source"], "error" in page)
        like = [p for p in shown["pages"] if (p["text_source"], "error" in p) == sort]
        assert like, f"the README's result shows no page like {sort}"
        where = f"pages[{sort[0]}{', error' if sort[1] else ''}]"
        missing += lacking(like[0], page, where)
        if page["blocks"]:
            missing += lacking(like[0]["blocks"][0], page["blocks"][0], f"{where}.blocks[]")
        if "error" in page:
            missing += lacking(like[0]["error"], page["error"], f"{where}.error")
            # The same fault says the same, with the README's page number.
            n, m = page["index"] + 1, like[0]["index"] + 1
            assert like[0]["error"] == {**page["error"],
                                        "message": page["error"]["message"].replace(f"page {n}", f"page {m}")}
    missing = sorted(set(missing))
    assert missing == [], f"fields of real results the README's example lacks: {missing}"
    assert shown["markdown"].startswith("<!-- page 1 -->\n\n") and results[0]["markdown"].startswith(
        "<!-- page 1 -->\n\n")


def test_the_readme_error_record_is_a_real_one(real: dict[str, dict[str, Any]]) -> None:
    shown, record = example(ERROR_EXAMPLE), real["notes.pdf"]
    assert shown["source"]["key"] == "input/notes.pdf"
    assert set(shown) == set(record)
    assert set(shown["source"]) == set(record["source"])
    assert set(shown["error"]) == set(record["error"])
    assert shown["schema_version"] == record["schema_version"] == ERROR_SCHEMA_VERSION
    assert shown["error"] == record["error"]  # code, message and attempts, as written
    assert record["error"]["message"] == not_a_document(NOTES, ".pdf")
    assert record["error"]["code"] == ErrorCode.UNSUPPORTED_FORMAT.value


def described(schema: dict[str, Any], record: Any, where: str) -> list[str]:
    """The keys of `record` that `schema` lists no property for, where it lists properties."""
    if isinstance(record, list) and isinstance(schema.get("items"), dict):
        return [k for item in record for k in described(schema["items"], item, f"{where}[]")]
    if not isinstance(record, dict) or "properties" not in schema:
        return []
    out = [f"{where}.{key}" for key in record if key not in schema["properties"]]
    for key, value in record.items():
        if key in schema["properties"]:
            out += described(schema["properties"][key], value, f"{where}.{key}")
    return sorted(set(out))


@pytest.mark.parametrize(("name", "schema"), [
    ("layer.pdf", "result-v2.json"), ("scan.pdf", "result-v2.json"),
    ("notes.pdf", "error-v1.json"), ("flat.pdf", "error-v1.json"),
])
def test_real_records_validate_and_every_field_is_in_the_schema(
        real: dict[str, dict[str, Any]], name: str, schema: str) -> None:
    record = real[name]
    jsonschema.Draft202012Validator(SCHEMAS[schema]).validate(record)
    assert described(SCHEMAS[schema], record, "record") == [], (
        f"fields of a real {name} record that {schema} does not describe")


def test_every_error_code_is_in_the_error_schema() -> None:
    codes = SCHEMAS["error-v1.json"]["properties"]["error"]["properties"]["code"]["enum"]
    absent = sorted({code.value for code in ErrorCode} - set(codes))
    unknown = sorted(set(codes) - {code.value for code in ErrorCode})
    assert (absent, unknown) == ([], []), (
        f"error-v1.json's error.code lacks codes the watcher writes: {absent}; "
        f"has codes it never writes: {unknown}")

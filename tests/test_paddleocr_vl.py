"""The paddleocr-vl engine without Paddle: result mapping from fixtures written to
PaddleOCR-VL's documented output schema, the exact PaddleOCRVL arguments, and the
engine's threading and multi-page handling driven through a stand-in pipeline."""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings
from vlm_fake import FakeVlmServer

from watcher.embedded import SeaweedS3
from watcher.engines import create_engine
from watcher.engines.base import WARMUP_TEXT, EngineState
from watcher.engines.paddleocr_vl import (
    PaddleOcrVlEngine,
    map_page,
    map_results,
    pipeline_kwargs,
)
from watcher.errors import EngineUnavailable
from watcher.settings import Settings

FIXTURES = Path(__file__).parent / "fixtures" / "paddleocr_vl"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def settings_for(weed: SeaweedS3, url: str = "http://127.0.0.1:9/v1", **overrides: Any) -> Settings:
    return make_settings(weed, "unused-bucket", engine="paddleocr-vl", vlm_url=url,
                         vlm_startup_timeout=10, **overrides)


class FakeResult:
    """Stand-in for a PaddleOCR-VL result object: `.json` and `.markdown` as Paddle has them."""

    def __init__(self, data: dict[str, Any]) -> None:
        data = copy.deepcopy(data)
        markdown = data.pop("markdown_texts", None)
        self.json = data
        self.markdown = {"markdown_texts": markdown, "markdown_images": {}}


class FakePipeline:
    """A FAKE of the paddle pipeline's predict/restructure_pages interface (PaddleOCRVL).

    It answers from fixtures (or a generated page for the warm-up image) and records
    which thread used it and how restructure_pages was called.
    """

    def __init__(self, results: list[dict[str, Any]], restructured: list[dict[str, Any]] | None) -> None:
        self.results = results
        self.restructured = restructured
        self.threads: set[int] = set()
        self.restructure_calls: list[dict[str, Any]] = []
        self.predicted: list[str] = []

    def predict(self, input: str) -> list[FakeResult]:
        self.threads.add(threading.get_ident())
        self.predicted.append(input)
        if input.endswith("page.png"):  # the engine's warm-up page
            return [FakeResult({"res": {"parsing_res_list": [
                {"block_label": "text", "block_content": WARMUP_TEXT, "block_bbox": [40, 70, 520, 120],
                 "block_id": 0, "block_order": 1}], "width": 640, "height": 200}})]
        return [FakeResult(r) for r in self.results]

    def restructure_pages(self, res_list: list[Any], merge_tables: bool = True,
                          relevel_titles: bool = True, concatenate_pages: bool = False) -> list[Any]:
        self.threads.add(threading.get_ident())
        self.restructure_calls.append({"pages": len(res_list), "merge_tables": merge_tables,
                                       "relevel_titles": relevel_titles,
                                       "concatenate_pages": concatenate_pages})
        assert self.restructured is not None
        return [FakeResult(r) for r in self.restructured]


class Factory:
    def __init__(
        self, results: list[dict[str, Any]], restructured: list[dict[str, Any]] | None = None
    ) -> None:
        self.results = results
        self.restructured = restructured
        self.built: list[FakePipeline] = []
        self.lock = threading.Lock()

    def __call__(self) -> FakePipeline:
        pipeline = FakePipeline(self.results, self.restructured)
        with self.lock:
            self.built.append(pipeline)
        return pipeline


@pytest.fixture
async def fake() -> AsyncIterator[FakeVlmServer]:
    server = await FakeVlmServer().start()
    yield server
    await server.stop()


# --- mapping ------------------------------------------------------------------------------
def test_single_page_keeps_every_block_with_types_boxes_html_latex_and_raw() -> None:
    data = fixture("single_page.json")
    markdown = (FIXTURES / "single_page.md").read_text()
    page = map_page(data["res"], 0, markdown)
    entries = data["res"]["parsing_res_list"]
    assert [b.type for b in page.blocks] == ["doc_title", "text", "table", "display_formula", "image"]
    assert [b.bbox for b in page.blocks] == [[float(v) for v in e["block_bbox"]] for e in entries]
    assert [b.order for b in page.blocks] == [1, 2, 3, 4, None]
    assert (page.width, page.height, page.index) == (1240, 1754, 0)
    table = page.blocks[2]
    assert table.extra["html"] == entries[2]["block_content"]
    assert table.text == "Region Q3 Q4\nNorth 1,200 1,350\nSouth 980 1,040"
    formula = page.blocks[3]
    assert formula.extra["latex"] == r"\Delta R = \frac{R_{Q4} - R_{Q3}}{R_{Q3}}"
    assert page.blocks[0].extra["polygon"] == [[132.0, 40.0], [1109.0, 40.0], [1109.0, 103.0], [132.0, 103.0]]
    assert page.blocks[0].text == "Quarterly Report 2025"
    assert page.markdown == markdown
    assert page.raw == data["res"]  # becomes pages[].raw in the result JSON


def test_markdown_is_built_from_blocks_when_the_result_has_none() -> None:
    page = map_page(fixture("single_page.json")["res"], 3)
    assert page.markdown.startswith("# Quarterly Report 2025\n\nRevenue grew by 12%")
    assert "<table" in page.markdown and "$$\n\\Delta R" in page.markdown
    assert page.index == 3


def test_page_size_falls_back_to_the_blocks_extent() -> None:
    page = map_page({"parsing_res_list": [{"block_label": "text", "block_content": "x",
                                           "block_bbox": [10, 20, 300.4, 400]}]}, 0)
    assert (page.width, page.height) == (301, 400)


def test_restructured_two_page_document_maps_the_merged_table() -> None:
    pages = map_results([FakeResult(r) for r in fixture("two_page_restructured.json")])
    assert [p.index for p in pages] == [0, 1]
    merged = pages[0].blocks[2]
    assert merged.type == "table" and merged.extra["html"].count("<tr>") == 5
    assert "2025-01-20 310.00" in merged.text
    assert [b.type for b in pages[1].blocks] == ["paragraph_title", "text", "footer"]
    assert pages[1].blocks[0].extra["global_block_id"] == 4
    assert pages[0].markdown.startswith("# Ledger\n\n## Payments")


# --- construction ---------------------------------------------------------------------------
def test_pipeline_kwargs_are_paddleocr_argument_names(weed: SeaweedS3) -> None:
    settings = settings_for(weed, "http://vllm:8080/v1", vlm_model="PaddleOCR-VL-0.9B",
                            vlm_max_concurrency=24, pipeline_version="v1.5", layout_device="gpu:0")
    assert pipeline_kwargs(settings) == {
        "pipeline_version": "v1.5",
        "vl_rec_backend": "vllm-server",
        "vl_rec_server_url": "http://vllm:8080/v1",
        "vl_rec_api_model_name": "PaddleOCR-VL-0.9B",
        "vl_rec_max_concurrency": 24,
        "device": "gpu:0",
    }
    # One pipeline per engine thread: the bound is shared out so the total stays at 24.
    split = settings_for(weed, vlm_max_concurrency=24, engine_concurrency=3, vlm_api_key="k-1")
    kwargs = pipeline_kwargs(split)
    assert kwargs["vl_rec_max_concurrency"] == 8 and kwargs["vl_rec_api_key"] == "k-1"


def test_importing_the_engine_does_not_import_paddle() -> None:
    code = (
        "import sys\n"
        "import watcher.engines.paddleocr_vl\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'paddle', 'paddleocr', 'paddlex'})\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_create_engine_builds_it_without_paddle(weed: SeaweedS3) -> None:
    engine = create_engine(settings_for(weed))
    assert isinstance(engine, PaddleOcrVlEngine) and engine.document_level
    assert "paddleocr" not in sys.modules


# --- the engine with the stand-in pipeline ----------------------------------------------------
async def test_one_pipeline_per_thread_and_multi_page_is_restructured(
    weed: SeaweedS3, fake: FakeVlmServer, tmp_path: Path
) -> None:
    factory = Factory(fixture("two_page_predict.json"), fixture("two_page_restructured.json"))
    engine = PaddleOcrVlEngine(settings_for(weed, fake.url, engine_concurrency=2),
                               pipeline_factory=factory)
    await engine.start()
    try:
        assert engine.state is EngineState.READY, engine.error
        doc = tmp_path / "ledger.pdf"
        doc.write_bytes(b"%PDF-1.4 stand-in")
        results = await asyncio.gather(*(engine.recognize_document(doc, "pdf", 2) for _ in range(6)))
    finally:
        await engine.close()
    assert 1 <= len(factory.built) <= 2
    owners = [p.threads for p in factory.built]
    assert all(len(t) == 1 for t in owners), owners  # a pipeline never crosses threads
    assert len(set().union(*owners)) == len(factory.built)  # and each thread has its own
    calls = [c for p in factory.built for c in p.restructure_calls]
    assert len(calls) == 6
    assert all(c == {"pages": 2, "merge_tables": True, "relevel_titles": True,
                     "concatenate_pages": False} for c in calls)
    for pages in results:
        assert len(pages) == 2
        assert pages[0].blocks[2].extra["html"].count("<tr>") == 5  # the merged table


async def test_single_page_is_not_restructured(
    weed: SeaweedS3, fake: FakeVlmServer, tmp_path: Path
) -> None:
    factory = Factory([fixture("single_page.json")])
    engine = PaddleOcrVlEngine(settings_for(weed, fake.url), pipeline_factory=factory)
    doc = tmp_path / "report.png"
    doc.write_bytes(b"stand-in")
    try:
        pages = await engine.recognize_document(doc, "png", 1)
    finally:
        await engine.close()
    assert factory.built[0].restructure_calls == []
    assert factory.built[0].predicted == [str(doc)]
    assert [b.type for b in pages[0].blocks][2:4] == ["table", "display_formula"]


async def test_unreachable_vlm_server_defers_the_document(weed: SeaweedS3, tmp_path: Path) -> None:
    class Refused(FakePipeline):
        def predict(self, input: str) -> list[FakeResult]:
            raise RuntimeError("Connection error.") from ConnectionRefusedError(111, "refused")

    engine = PaddleOcrVlEngine(settings_for(weed), pipeline_factory=lambda: Refused([], None))
    doc = tmp_path / "x.png"
    doc.write_bytes(b"stand-in")
    try:
        with pytest.raises(EngineUnavailable):
            await engine.recognize_document(doc, "png", 1)
    finally:
        await engine.close()
    assert engine.unavailable is not None and "127.0.0.1:9" in engine.unavailable


async def test_other_pipeline_errors_with_a_healthy_server_are_crashes(
    weed: SeaweedS3, fake: FakeVlmServer, tmp_path: Path
) -> None:
    class Broken(FakePipeline):
        def predict(self, input: str) -> list[FakeResult]:
            raise ValueError("bad page")

    engine = PaddleOcrVlEngine(settings_for(weed, fake.url), pipeline_factory=lambda: Broken([], None))
    doc = tmp_path / "x.png"
    doc.write_bytes(b"stand-in")
    try:
        with pytest.raises(ValueError):
            await engine.recognize_document(doc, "png", 1)
    finally:
        await engine.close()
    assert engine.unavailable is None


async def test_warm_up_reports_a_wrong_model_name(weed: SeaweedS3, fake: FakeVlmServer) -> None:
    fake.served_model = "something-else"
    engine = PaddleOcrVlEngine(settings_for(weed, fake.url), pipeline_factory=Factory([]))
    await engine.start()
    await engine.close()
    assert engine.state is EngineState.FAILED
    assert engine.error is not None and "PaddleOCR-VL-0.9B" in engine.error
    assert "--served-model-name" in engine.error

"""The paddleocr-vl engine without Paddle: result mapping from fixtures written to
PaddleOCR-VL's documented output schema, the exact PaddleOCRVL arguments, and the
engine's batching, restructuring and failure handling in its worker process, driven
through the labelled fake pipeline in tests/fakes/fake_paddleocr.py."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings
from PIL import Image, ImageColor
from vlm_fake import FakeVlmServer

from watcher.cli.embedded import SeaweedS3
from watcher.core.errors import EngineCrashed, EngineUnavailable
from watcher.core.pages import RenderedPage
from watcher.core.settings import Settings
from watcher.engines import create_engine
from watcher.engines.base import EngineState
from watcher.engines.child import EngineMisconfigured
from watcher.engines.paddleocr_vl import (
    FIXED_BATCH_PAGES,
    PaddleOcrVlEngine,
    layout_device_errors,
    map_page,
    map_results,
    pipeline_kwargs,
    worker_env,
)

pytestmark = pytest.mark.e2e  # engine worker processes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from gpu_sim import GpuSimulator  # noqa: E402 - the benchmark's labelled fake of a vLLM GPU

FIXTURES = Path(__file__).parent / "fixtures" / "paddleocr_vl"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def settings_for(weed: SeaweedS3, url: str = "http://127.0.0.1:9/v1", **overrides: Any) -> Settings:
    # One pipeline unless a test says otherwise: the fake's log is then one process's.
    overrides.setdefault("engine_concurrency", 1)
    return make_settings(weed, "unused-bucket", engine="paddleocr-vl", vlm_url=url,
                         vlm_startup_timeout=10, **overrides)


class FakeResult:
    """Stand-in for a PaddleOCR-VL result object: `.json` and `.markdown` as Paddle has them."""

    def __init__(self, data: dict[str, Any]) -> None:
        data = copy.deepcopy(data)
        markdown = data.pop("markdown_texts", None)
        self.json = data
        self.markdown = {"markdown_texts": markdown, "markdown_images": {}}


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
    # Two pipelines unless told otherwise, so that one detects layout while the other's
    # blocks are at the server.
    default = make_settings(weed, "unused-bucket", engine="paddleocr-vl", vlm_max_concurrency=24)
    assert default.engine_concurrency == 2 and pipeline_kwargs(default)["vl_rec_max_concurrency"] == 12
    assert make_settings(weed, "unused-bucket").engine_concurrency == 1  # the CPU engine's


def test_only_a_gpu_layout_device_turns_paddlex_device_fallback_off(weed: SeaweedS3) -> None:
    fallback_off = {"PADDLE_PDX_DISABLE_DEVICE_FALLBACK": "True"}
    assert worker_env(settings_for(weed)) == fallback_off  # the default device: gpu
    assert worker_env(settings_for(weed, layout_device="gpu:1")) == fallback_off
    assert worker_env(settings_for(weed, layout_device="cpu")) == {}
    assert worker_env(settings_for(weed, layout_device="npu:0")) == {}  # PaddleX checks GPUs only


# What PaddleX 3.7.2 raises (PaddlePredictorOption.setdefault_by_model_name,
# paddlex/inference/models/runners/paddle_static/config/pp_option.py).
PADDLEX_NO_GPU = ("Device fallback is disabled and the specified device (GPU) is not available. "
                  "To fall back to CPU instead, unset the PADDLE_PDX_DISABLE_DEVICE_FALLBACK "
                  "environment variable.")


def test_paddlex_device_error_and_only_it_is_a_misconfiguration() -> None:
    with pytest.raises(EngineMisconfigured) as raised, layout_device_errors("gpu:0"):
        raise RuntimeError(PADDLEX_NO_GPU)
    assert "WATCHER_LAYOUT_DEVICE=gpu:0" in str(raised.value)
    assert "WATCHER_LAYOUT_DEVICE=cpu" in str(raised.value)  # the way out, named
    with pytest.raises(EngineMisconfigured), layout_device_errors("gpu"):  # wrapped by a pipeline
        try:
            raise RuntimeError(PADDLEX_NO_GPU)
        except RuntimeError as exc:
            raise ValueError("cannot create the layout model") from exc
    with pytest.raises(RuntimeError, match="out of memory"), layout_device_errors("gpu"):
        raise RuntimeError("CUDA error: out of memory")  # anything else: an ordinary error


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
    assert isinstance(engine, PaddleOcrVlEngine)
    assert "paddleocr" not in sys.modules


# --- the engine in its worker process, with the labelled fake pipeline ------------------------
FAKE = "fake_paddleocr:PaddleOCRVL"


def page_of(index: int, colour: str = "white", size: tuple[int, int] = (800, 1000)) -> RenderedPage:
    image = Image.new("RGB", size, "white")
    image.putpixel((0, 0), ImageColor.getrgb(colour))
    return RenderedPage(index, image, *size)


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def fake_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "paddle-calls.jsonl"
    monkeypatch.setenv("FAKE_PADDLEOCR_LOG", str(log))  # inherited by the worker process
    return log


async def test_pages_reach_predict_in_batches_and_the_document_is_restructured(
    weed: SeaweedS3, fake: FakeVlmServer, fake_log: Path
) -> None:
    engine = PaddleOcrVlEngine(settings_for(weed, fake.url), pipeline_factory=FAKE)
    await engine.start()
    try:
        assert engine.state is EngineState.READY, engine.error
        pages = await asyncio.gather(*(engine.recognise(page_of(i)) for i in range(6)))
        finished = await engine.finish_document(list(pages))
    finally:
        await engine.close()
    log = calls(fake_log)
    init = [c for c in log if c["event"] == "init"]
    assert len(init) == 1 and init[0]["pid"] != os.getpid()  # built in the worker process
    assert "vl_rec_server_url" in init[0]["kwargs"]
    batches = [c["pages"] for c in log if c["event"] == "predict"][1:]  # after the warm-up
    assert sum(batches) == 6 and max(batches) <= 4
    # A block that loops stops at WATCHER_VLM_MAX_TOKENS.
    assert {json.dumps(c["kwargs"]) for c in log if c["event"] == "predict"} == {'{"max_new_tokens": 4096}'}
    assert [c for c in log if c["event"] == "restructure"] == [
        {"event": "restructure", "pid": init[0]["pid"], "pages": 6, "merge_tables": True,
         "relevel_titles": True, "concatenate_pages": False}]
    assert [p.index for p in finished] == list(range(6))
    assert [b.type for b in finished[0].blocks] == ["doc_title", "text", "table"]
    assert finished[5].blocks[2].extra["global_block_id"] == 17  # numbered across the document
    assert finished[0].blocks[2].extra["html"].startswith("<table>")


async def test_a_single_page_is_not_restructured(
    weed: SeaweedS3, fake: FakeVlmServer, fake_log: Path
) -> None:
    engine = PaddleOcrVlEngine(settings_for(weed, fake.url), pipeline_factory=FAKE)
    await engine.start()
    try:
        page = await engine.recognise(page_of(0))
        assert await engine.finish_document([page]) == [page]
    finally:
        await engine.close()
    assert not [c for c in calls(fake_log) if c["event"] == "restructure"]
    assert (page.width, page.height) == (800, 1000)


async def test_a_connection_error_defers_the_document_instead_of_charging_it(
    weed: SeaweedS3, fake: FakeVlmServer, fake_log: Path
) -> None:
    engine = PaddleOcrVlEngine(settings_for(weed, fake.url), pipeline_factory=FAKE)
    await engine.start()
    try:
        with pytest.raises(EngineUnavailable):
            await engine.recognise(page_of(0, "cyan"))
    finally:
        await engine.close()
    assert engine.unavailable is not None and fake.url in engine.unavailable


async def test_other_pipeline_errors_with_a_healthy_server_are_crashes(
    weed: SeaweedS3, fake: FakeVlmServer, fake_log: Path
) -> None:
    engine = PaddleOcrVlEngine(settings_for(weed, fake.url), pipeline_factory=FAKE)
    await engine.start()
    try:
        # Yellow in RGB reads as cyan (a connection error) if the BGR conversion is wrong.
        with pytest.raises(EngineCrashed) as raised:
            await engine.recognise(page_of(0, "yellow"))
        assert raised.value.reason == "error" and "cannot process this image" in raised.value.detail
        assert engine.snapshot()["workers"][0]["restarts"] == 0  # the process is fine
        good = await engine.recognise(page_of(1))
    finally:
        await engine.close()
    assert engine.unavailable is None and good.blocks


async def test_warm_up_reports_a_wrong_model_name(weed: SeaweedS3, fake: FakeVlmServer) -> None:
    fake.served_model = "something-else"
    engine = PaddleOcrVlEngine(settings_for(weed, fake.url), pipeline_factory=FAKE)
    await engine.start()
    await engine.close()
    assert engine.state is EngineState.FAILED
    assert engine.error is not None and "PaddleOCR-VL-1.6-0.9B" in engine.error
    assert "--served-model-name" in engine.error


async def test_a_gpu_paddle_cannot_see_fails_warm_up_once_naming_the_setting(
    weed: SeaweedS3, fake: FakeVlmServer, fake_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon's own environment allows the fallback; the workers must not.
    monkeypatch.setenv("PADDLE_PDX_DISABLE_DEVICE_FALLBACK", "False")
    monkeypatch.setenv("FAKE_PADDLE_GPUS", "0")  # the fake Paddle sees no GPU
    engine = PaddleOcrVlEngine(settings_for(weed, fake.url, layout_device="gpu:0"), pipeline_factory=FAKE)
    try:
        await asyncio.wait_for(engine.start(), 60)
        assert engine.state is EngineState.FAILED
        assert engine.error is not None and engine.error.startswith(
            "EngineMisconfigured: WATCHER_LAYOUT_DEVICE=gpu:0: Paddle sees no usable GPU"), engine.error
        worker = engine.snapshot()["workers"][0]
        assert worker["state"] == "failed" and worker["pid"] is None and worker["restarts"] == 0
        assert all(slot.done() for slot in engine._slots)  # not retried
        await engine.start()  # the daemon's periodic retry: answered without a new worker
        assert engine.state is EngineState.FAILED and "WATCHER_LAYOUT_DEVICE=gpu:0" in (engine.error or "")
        with pytest.raises(EngineUnavailable):
            await engine.recognise(page_of(0))
    finally:
        await engine.close()
    inits = [c for c in calls(fake_log) if c["event"] == "init"]
    assert len(inits) == 1 and inits[0]["pid"] != os.getpid()
    assert inits[0]["fallback_disabled"] is True and inits[0]["device"] == "gpu:0"
    assert os.environ["PADDLE_PDX_DISABLE_DEVICE_FALLBACK"] == "False"  # set in the worker only


async def test_a_cpu_layout_device_runs_where_paddle_sees_no_gpu(
    weed: SeaweedS3, fake: FakeVlmServer, fake_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PADDLE_PDX_DISABLE_DEVICE_FALLBACK", raising=False)
    monkeypatch.setenv("FAKE_PADDLE_GPUS", "0")
    engine = PaddleOcrVlEngine(settings_for(weed, fake.url, layout_device="cpu"), pipeline_factory=FAKE)
    await engine.start()
    try:
        assert engine.state is EngineState.READY, engine.error
    finally:
        await engine.close()
    (init,) = [c for c in calls(fake_log) if c["event"] == "init"]
    assert init["device"] == "cpu" and init["fallback_disabled"] is False


# --- pages per call, steered from vLLM's gauges ------------------------------------------------
@pytest.fixture
def blocks_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake pipeline sends its blocks to the server, as the real one does."""
    monkeypatch.setenv("FAKE_PADDLEOCR_SEND_BLOCKS", "1")
    monkeypatch.setenv("FAKE_PADDLEOCR_BLOCKS", "2")


async def test_pages_per_call_grow_until_the_server_is_full(
    weed: SeaweedS3, fake_log: Path, blocks_sent: None
) -> None:
    # A LABELLED FAKE of a vLLM GPU (bench/gpu_sim.py): 128 sequence slots, vLLM's gauges.
    sim = await GpuSimulator(slots=128, service_time=0.3).start()
    settings = settings_for(weed, sim.url, vlm_max_concurrency=256, engine_concurrency=2)
    engine = PaddleOcrVlEngine(settings, pipeline_factory=FAKE)
    await engine.start()
    try:
        assert engine.state is EngineState.READY, engine.error
        pages = await asyncio.gather(*(engine.recognise(page_of(i, size=(400, 300)))
                                       for i in range(500)))
        health = engine.snapshot()["vlm_requests"]
    finally:
        await engine.close()
        await sim.stop()
    assert all(p.blocks[1].text == "Simulated text of a 320x40 page" for p in pages)
    assert sim.requests == 2 * 500
    # With its fixed 4 pages per call, two pipelines would keep 2 x 4 x 2 = 16 requests at
    # the server; steered, every slot was busy.
    assert sim.max_inflight == 128
    assert max(c["pages"] for c in calls(fake_log) if c["event"] == "predict") > 4
    assert health["mode"] == "metrics" and health["blocks_per_page"] == 2.0


async def test_without_gauges_a_call_keeps_its_fixed_pages(
    weed: SeaweedS3, fake_log: Path, blocks_sent: None
) -> None:
    sim = await GpuSimulator(slots=128, service_time=0.05, metrics=False).start()
    engine = PaddleOcrVlEngine(settings_for(weed, sim.url, engine_concurrency=2), pipeline_factory=FAKE)
    await engine.start()
    try:
        await asyncio.gather(*(engine.recognise(page_of(i, size=(400, 300))) for i in range(40)))
        assert engine.snapshot()["vlm_requests"]["mode"] == "latency"
    finally:
        await engine.close()
        await sim.stop()
    assert max(c["pages"] for c in calls(fake_log) if c["event"] == "predict") <= FIXED_BATCH_PAGES

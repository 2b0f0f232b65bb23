"""A supervised engine whose reader says its settings cannot work (EngineMisconfigured):
the worker is not started again, its pages are handed back uncharged, and the engine is
`failed` with the reader's message. Driven by the labelled fake reader in
tests/fakes/losing_device_reader.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from PIL import Image
from waiting import eventually

from watcher.core.errors import EngineUnavailable
from watcher.core.pages import RenderedPage
from watcher.engines.base import EngineState
from watcher.engines.child import EngineMisconfigured, ReaderSpec
from watcher.engines.supervisor import SupervisedEngine

pytestmark = pytest.mark.e2e  # engine worker processes


def page(index: int) -> RenderedPage:
    return RenderedPage(index, Image.new("RGB", (8, 8), "white"), 8, 8)


async def test_a_reader_that_loses_its_device_hands_pages_back_and_is_not_restarted(
    tmp_path: Path,
) -> None:
    gone = tmp_path / "gone"
    engine = SupervisedEngine(ReaderSpec("losing_device_reader:LosingDeviceReader", {"gone": str(gone)}),
                              name="t", model="t", batch_pages=4)
    await engine.start()
    try:
        assert engine.state is EngineState.READY, engine.error
        assert (await engine.recognise(page(0))).index == 0
        gone.touch()
        results = await asyncio.wait_for(
            asyncio.gather(*(engine.recognise(page(i)) for i in range(1, 4)), return_exceptions=True), 60)
        # Unavailable, not crashed: the pages wait for the fix without using an attempt.
        assert all(isinstance(r, EngineUnavailable) for r in results), results
        assert "the fake device is gone" in str(results[0])
        assert engine.state is EngineState.FAILED
        assert engine.error is not None and "WATCHER_LAYOUT_DEVICE=gpu" in engine.error
        worker = engine.snapshot()["workers"][0]
        assert worker["last_restart_reason"] == "misconfigured" and worker["restarts"] == 1
        assert worker["state"] == "failed" and worker["pid"] is None
        assert all(slot.done() for slot in engine._slots)  # nothing will start it again
        with pytest.raises(EngineUnavailable):
            await engine.recognise(page(9))
        with pytest.raises(EngineMisconfigured):
            await engine.warm()
    finally:
        await engine.close()
    # The first warm-up, and the one after the failed batch that found the device gone.
    assert len((tmp_path / "gone.warms").read_text().splitlines()) == 2


async def test_a_misconfigured_reader_fails_warm_up_once_among_several_workers(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.touch()
    engine = SupervisedEngine(ReaderSpec("losing_device_reader:LosingDeviceReader", {"gone": str(gone)}),
                              name="t", model="t", workers=2)
    try:
        await asyncio.wait_for(engine.start(), 60)
        assert engine.state is EngineState.FAILED
        assert engine.error == "EngineMisconfigured: WATCHER_LAYOUT_DEVICE=gpu: the fake device is gone"
        # Every worker's slot has ended: nothing can warm it up again, so the count of
        # warm-ups below is final.
        await eventually(lambda: all(slot.done() for slot in engine._slots), 30,
                         "every worker's slot to end")
    finally:
        await engine.close()
    assert len((tmp_path / "gone.warms").read_text().splitlines()) == 2  # one per worker, once

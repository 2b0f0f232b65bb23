"""A supervised engine whose reader says its settings cannot work (EngineMisconfigured):
the worker is not started again, its pages are handed back uncharged, and the engine is
`failed` with the reader's message. Driven by the labelled fake reader in
tests/fakes/losing_device_reader.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from waiting import eventually

from watcher.core.errors import EngineCrashed, EngineUnavailable
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


async def test_a_worker_that_fails_to_spawn_is_retried_and_its_pages_are_not_stuck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_start = SupervisedEngine._start_process
    failures = {"left": 2}

    async def start_or_fail(self: SupervisedEngine, worker: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(24, "Too many open files")  # what spawning can meet
        await real_start(self, worker)

    monkeypatch.setattr(SupervisedEngine, "_start_process", start_or_fail)
    engine = SupervisedEngine(ReaderSpec("losing_device_reader:LosingDeviceReader",
                                         {"gone": str(tmp_path / "gone")}), name="t", model="t")
    try:
        await asyncio.wait_for(engine.start(), 60)
        # Not ready while no worker could be started; ready once one is (after two failed
        # spawns, backed off); its slot never ended.
        assert engine.state is EngineState.FAILED and "Too many open files" in (engine.error or "")
        await eventually(lambda: engine.state is EngineState.READY, 30, "a worker to start at last")
        assert (await asyncio.wait_for(engine.recognise(page(3)), 30)).index == 3
        assert failures["left"] == 0
    finally:
        await engine.close()


async def test_a_bug_while_serving_fails_its_page_restarts_the_worker_and_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_deliver = SupervisedEngine._deliver
    bugs = {"left": 1}

    def deliver_or_fail(self: SupervisedEngine, batch: list[Any], op: str, results: Any) -> None:
        if bugs["left"]:
            bugs["left"] -= 1
            raise KeyError("a bug in the supervisor")
        real_deliver(self, batch, op, results)

    monkeypatch.setattr(SupervisedEngine, "_deliver", deliver_or_fail)
    engine = SupervisedEngine(ReaderSpec("losing_device_reader:LosingDeviceReader",
                                         {"gone": str(tmp_path / "gone")}), name="t", model="t")
    await asyncio.wait_for(engine.start(), 60)
    try:
        with pytest.raises(EngineCrashed, match="worker slot failed: KeyError"):
            await asyncio.wait_for(engine.recognise(page(0)), 30)
        assert (await asyncio.wait_for(engine.recognise(page(1)), 60)).index == 1
        worker = engine.snapshot()["workers"][0]
        assert worker["last_restart_reason"] == "error" and worker["restarts"] == 1
        assert not any(slot.done() for slot in engine._slots)
    finally:
        await engine.close()


async def test_a_page_nobody_answers_is_handed_back_at_its_deadline(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    engine = SupervisedEngine(ReaderSpec("losing_device_reader:LosingDeviceReader", {"gone": str(gone)}),
                              name="t", model="t", timeout=0.2, warm_timeout=0.2)
    await asyncio.wait_for(engine.start(), 60)
    try:
        for slot in engine._slots:  # every slot gone, as a bug in the supervisor could do
            slot.cancel()
        await asyncio.gather(*engine._slots, return_exceptions=True)
        with pytest.raises(EngineUnavailable, match="no engine worker answered"):
            await asyncio.wait_for(engine.recognise(page(0)), 30)
    finally:
        await engine.close()

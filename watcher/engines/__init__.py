"""OCR engines behind one interface; `create_engine` picks one by settings."""

from __future__ import annotations

from watcher.engines.base import Block, Engine, EngineState, PageResult
from watcher.settings import EngineName, Settings


def create_engine(settings: Settings) -> Engine:
    # Imports stay inside the branches: the GPU engines must not be imported on a CPU box.
    if settings.engine is EngineName.CPU:
        from watcher.engines.cpu import CpuEngine

        return CpuEngine(concurrency=settings.engine_concurrency)
    raise NotImplementedError(f"WATCHER_ENGINE={settings.engine.value} is not available yet")


__all__ = ["Block", "Engine", "EngineState", "PageResult", "create_engine"]

"""OCR engines behind one interface; `create_engine` picks one by settings."""

from __future__ import annotations

from watcher.engines.base import Block, Engine, EngineState, PageResult
from watcher.settings import EngineName, Settings


def create_engine(settings: Settings) -> Engine:
    # Imports stay inside the branches: the GPU engines must not be imported on a CPU box.
    if settings.engine is EngineName.CPU:
        from watcher.engines.cpu import CpuEngine

        return CpuEngine(concurrency=settings.engine_concurrency)
    if settings.engine is EngineName.OPENAI_VLM:
        from watcher.engines.openai_vlm import OpenAIVlmEngine

        return OpenAIVlmEngine(settings)
    if settings.engine is EngineName.PADDLEOCR_VL:
        # Importing the module is cheap: paddleocr itself loads inside the worker threads.
        from watcher.engines.paddleocr_vl import PaddleOcrVlEngine

        return PaddleOcrVlEngine(settings)
    raise NotImplementedError(f"WATCHER_ENGINE={settings.engine.value} is not available yet")


__all__ = ["Block", "Engine", "EngineState", "PageResult", "create_engine"]

"""OCR engines behind one interface; `create_engine` picks one by settings."""

from __future__ import annotations

from watcher.core.settings import EngineName, Settings
from watcher.engines.base import Engine, EngineState

# Loading models in a fresh worker process is slow on a small CPU box; a worker that has
# not warmed in this long is broken, not slow.
MIN_WARM_TIMEOUT = 300.0


def create_engine(settings: Settings) -> Engine:
    # Imports stay inside the branches: the GPU engines must not be imported on a CPU box.
    if settings.engine is EngineName.CPU:
        from watcher.engines.child import ReaderSpec
        from watcher.engines.cpu import model_description
        from watcher.engines.supervisor import SupervisedEngine

        return SupervisedEngine(
            ReaderSpec("watcher.engines.cpu:CpuReader",
                       {"languages": settings.ocr_languages, "tessdata": settings.tessdata_dir}),
            name="cpu",
            model=model_description(settings.ocr_languages),
            workers=settings.engine_concurrency,
            timeout=settings.engine_timeout,
            warm_timeout=max(MIN_WARM_TIMEOUT, settings.engine_timeout),
            max_rss_mb=settings.engine_max_rss_mb,
        )
    if settings.engine is EngineName.OPENAI_VLM:
        from watcher.engines.openai_vlm import OpenAIVlmEngine

        return OpenAIVlmEngine(settings)
    if settings.engine is EngineName.PADDLEOCR_VL:
        # Importing the module is cheap: paddleocr itself loads in the worker processes.
        from watcher.engines.paddleocr_vl import PaddleOcrVlEngine

        return PaddleOcrVlEngine(settings)
    raise NotImplementedError(f"WATCHER_ENGINE={settings.engine.value} is not available yet")


__all__ = ["Engine", "EngineState", "create_engine"]

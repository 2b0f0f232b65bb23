"""Background tasks that must not die silently: a task that raises is logged and started
again with backoff, until it is cancelled."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from typing import Any

from watcher.core.logs import get_logger

log = get_logger("watcher.service.tasks")

MAX_WAIT_SECONDS = 60.0


def keep_running(name: str, start: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
    """Run `start()` as a task; if it raises (or returns), log it and run it again."""
    return asyncio.create_task(_forever(name, start), name=name)


async def _forever(name: str, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
    failures = 0
    while True:
        try:
            await start()
            error = "returned"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.error("background_task_failed", task=name, error=error, exc_info=True)
        else:
            log.error("background_task_ended", task=name)
        failures += 1
        # Jittered, doubling from 1 s to a minute.
        delay = random.uniform(0.5, 1.0) * min(MAX_WAIT_SECONDS, 2.0 ** (failures - 1))
        log.info("background_task_restarting", task=name, after_seconds=round(delay, 1), error=error)
        await asyncio.sleep(delay)

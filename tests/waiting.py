"""The one way tests wait: for the event that proves the thing, never for a fixed time.

`eventually(check)` polls `check` (a function, or a coroutine function, returning a truthy
value) until it holds, and fails with `what` when it has not within `timeout`; the
synchronous twin is for tests that drive processes from a plain thread.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

Check = Callable[[], Any] | Callable[[], Awaitable[Any]]


async def eventually(check: Check, timeout: float = 30.0, what: str = "", every: float = 0.1) -> Any:
    """The first truthy value of `check()`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or check}")
        await asyncio.sleep(every)


def eventually_sync(check: Callable[[], Any], timeout: float = 30.0, what: str = "",
                    every: float = 0.1) -> Any:
    """`eventually` for tests without an event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or check}")
        time.sleep(every)

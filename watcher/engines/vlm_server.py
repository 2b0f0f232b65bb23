"""The VLM server (vLLM, OpenAI-compatible) as both VLM engines see it.

Both engines wait for the same `/health` at start-up, check that the served model name
matches WATCHER_VLM_MODEL, and run the same background probe that brings an engine back
after the server was unreachable; so that logic lives here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from watcher.core.logs import get_logger
from watcher.engines.base import Engine

log = get_logger("watcher.engine")

# A probe must never hang the probe loop: the server either answers fast or is "down".
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=5)


def server_root(url: str) -> str:
    """vLLM serves /health at its root, beside (not under) the OpenAI-style /v1."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def is_healthy(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(f"{server_root(url)}/health", timeout=PROBE_TIMEOUT) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


async def wait_for_health(
    session: aiohttp.ClientSession,
    url: str,
    timeout: float,
    engine: str,
    interval: float = 1.0,
    log_every: float = 15.0,
) -> None:
    """Wait until the server answers /health; a cold vLLM start takes minutes."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    next_log = started
    while not await is_healthy(session, url):
        now = loop.time()
        if now - started > timeout:
            raise TimeoutError(
                f"the VLM server at {server_root(url)} did not answer /health within "
                f"{timeout:g} s (WATCHER_VLM_STARTUP_TIMEOUT); is vLLM running?"
            )
        if now >= next_log:
            log.info("vlm_server_waiting", engine=engine, url=server_root(url),
                     waited_seconds=round(now - started, 1), timeout_seconds=timeout)
            next_log = now + log_every
        await asyncio.sleep(interval)
    log.info("vlm_server_healthy", engine=engine, url=server_root(url),
             waited_seconds=round(loop.time() - started, 1))


async def served_models(
    session: aiohttp.ClientSession, url: str, api_key: str | None
) -> list[str] | None:
    """Model ids from GET {url}/models; None when the server has no such endpoint."""
    async with session.get(
        f"{url.rstrip('/')}/models", headers=auth_headers(api_key), timeout=PROBE_TIMEOUT
    ) as resp:
        if resp.status == 404:
            return None
        resp.raise_for_status()
        body: Any = await resp.json(content_type=None)
    data = body.get("data") if isinstance(body, dict) else None
    return [str(m.get("id")) for m in data or [] if isinstance(m, dict)]


def model_mismatch_message(model: str, available: list[str] | str) -> str:
    served = ", ".join(available) if isinstance(available, list) else available
    return (
        f"the VLM server does not serve model {model!r} (server says: {served}); "
        f"check that WATCHER_VLM_MODEL matches vLLM's --served-model-name"
    )


async def check_model(
    session: aiohttp.ClientSession, url: str, model: str, api_key: str | None
) -> None:
    models = await served_models(session, url, api_key)
    if models is not None and model not in models:
        raise RuntimeError(model_mismatch_message(model, models or ["no models"]))


async def probe_forever(
    engine: Engine,
    session: aiohttp.ClientSession,
    url: str,
    interval: float,
    on_healthy: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """While the engine is marked unavailable, probe /health and clear the mark.

    `on_healthy` runs on every healthy probe; the engines use it to leave a FAILED state
    once the operator fixed what made it fail (a wrong served model name).
    """
    last_error_log = 0.0
    while True:
        await asyncio.sleep(interval)
        try:
            if engine.unavailable is None and on_healthy is None:
                continue
            if not await is_healthy(session, url):
                continue
            if engine.unavailable is not None:
                engine.mark_available()
            if on_healthy is not None:
                await on_healthy()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The probe is the only way back to service: it must outlive any surprise.
            if time.monotonic() - last_error_log > 60:
                log.warning("vlm_probe_error", engine=engine.name, error=f"{type(exc).__name__}: {exc}")
                last_error_log = time.monotonic()


async def close_probe_and_session(
    probe: asyncio.Task[None] | None, session: aiohttp.ClientSession | None
) -> None:
    """Stop an engine's probe before its HTTP session, which the probe uses."""
    if probe is not None:
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
    if session is not None:
        await session.close()

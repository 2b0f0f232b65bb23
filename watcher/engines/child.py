"""The engine worker process: native inference, away from the daemon's event loop.

The daemon (watcher/engines/supervisor.py) starts this with multiprocessing's `spawn`
and talks to it over one duplex pipe, one request at a time:

    ("warm",)                      -> ("ok", None)
    ("pages", [RenderedPage, ...]) -> ("ok", [PageResult, ...])
    ("finish", [PageResult, ...])  -> ("ok", [PageResult, ...])
    ("stop",)                      -> the process exits

and answers a failure as ("document_error", code, message) for a page that is itself
bad, ("misconfigured", type, message, False) when the reader cannot work with the
settings it was given (`EngineMisconfigured`: no new worker would do better), or
("error", type, message, connection_error) for anything else the engine raised.

Environment variables the reader needs (`ReaderSpec.env`) are set here, before the reader
is built and so before its libraries are imported: they hold in this process whatever
the daemon's environment says, in the image or outside it.

The process must never outlive the daemon, even one killed with SIGKILL: the kernel
kills it when its parent dies (Linux `PR_SET_PDEATHSIG`), and a watchdog thread checks
the parent as a fallback where that is not available. Ctrl-C reaches the whole process
group, but only the daemon decides when its workers stop, so SIGINT is ignored here.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from watcher.core.errors import DocumentError
from watcher.engines.base import PageReader

_PR_SET_PDEATHSIG = 1
WORKER_NICENESS = 10


class EngineMisconfigured(Exception):
    """The reader cannot work with its settings (a device that is not there), which no
    restart of its worker can change: the supervisor stops retrying that worker and the
    engine turns `failed` with this message, which names the setting to change."""


@dataclass(frozen=True)
class ReaderSpec:
    """What the worker builds: `target` is "module:callable", called with `kwargs`, in a
    process whose environment has `env` set (overriding the daemon's) before the import."""

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def build(self) -> PageReader:
        module, _, attr = self.target.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        reader: PageReader = factory(**self.kwargs)
        return reader


def looks_like_connection_error(exc: BaseException) -> bool:
    """True when an exception (or its cause chain) is a network failure, by type or name.

    Engine libraries wrap their HTTP client errors in types of their own; the names are
    the stable part.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        name = type(current).__name__
        if isinstance(current, ConnectionError | TimeoutError) or "Connection" in name or "Timeout" in name:
            return True
        current = current.__cause__ or current.__context__
    return False


def _die_with_parent(parent_pid: int) -> None:
    libc_name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc_name:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _answer(reader: PageReader, message: tuple[Any, ...]) -> tuple[Any, ...]:
    op = message[0]
    try:
        if op == "warm":
            reader.warm()
            return ("ok", None)
        if op == "pages":
            return ("ok", reader.recognise_pages(message[1]))
        if op == "finish":
            return ("ok", reader.finish_document(message[1]))
        return ("error", "ValueError", f"unknown request {op!r}", False)
    except DocumentError as exc:
        return ("document_error", exc.code.value, exc.message)
    except EngineMisconfigured as exc:
        return ("misconfigured", type(exc).__name__, str(exc)[:2000], False)
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc)[:2000], looks_like_connection_error(exc))


def main(conn: Connection, spec: ReaderSpec, parent_pid: int) -> None:
    """The worker's whole life: build the reader, then answer requests until told to stop."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Inference takes every core it can; the daemon's event loop (/health, S3 I/O) must
    # still get the CPU at once when it wakes.
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)
    os.environ.update(spec.env)
    reader: PageReader | None = None
    failure: tuple[Any, ...] = ()
    try:
        reader = spec.build()
    except EngineMisconfigured as exc:
        failure = ("misconfigured", type(exc).__name__, str(exc)[:2000], False)
    except Exception as exc:
        # Reported on the first request (the warm-up), so /ready can say why.
        failure = ("error", type(exc).__name__, f"cannot load the engine: {exc}"[:2000], False)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the daemon went away
        if message[0] == "stop":
            return
        answer = failure if reader is None else _answer(reader, message)
        try:
            conn.send(answer)
        except (BrokenPipeError, OSError):
            return

"""A FAKE page reader for the supervised engine: every page aborts its worker process.

Before it aborts it holds memory and threads, as a real engine's worker does, so the
kernel takes a while to tear the process down after its descriptors close: the window
in which the daemon sees the pipe break but cannot read the exit status yet.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any


class DyingReader:
    batch_pages = 1

    def __init__(self, hold_mb: int = 200, threads: int = 4) -> None:
        self.hold_mb = hold_mb
        self.threads = threads

    def warm(self) -> None:
        return None

    def recognise_pages(self, pages: list[Any]) -> list[Any]:
        held = bytearray(self.hold_mb * 1024 * 1024)
        for offset in range(0, len(held), 4096):  # touch every page so it is resident
            held[offset] = 1
        for _ in range(self.threads):
            threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
        os.abort()

    def finish_document(self, pages: list[Any]) -> list[Any]:
        return pages

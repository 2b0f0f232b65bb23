"""A FAKE page reader for the supervised engine whose device goes away.

It warms and reads pages (each page comes back empty) until the file named by `gone`
exists; from then on every warm-up and every batch raises EngineMisconfigured, as the
paddleocr-vl reader does when PaddleX reports that the GPU it was told to use is not
there. Each warm-up appends a line to `gone + ".warms"`, so that a test can count them
across worker processes.
"""

from __future__ import annotations

import os
from typing import Any

from watcher.core.pages import PageResult
from watcher.engines.child import EngineMisconfigured


class LosingDeviceReader:
    batch_pages = 4

    def __init__(self, gone: str) -> None:
        self.gone = gone

    def _check(self) -> None:
        if os.path.exists(self.gone):
            raise EngineMisconfigured("WATCHER_LAYOUT_DEVICE=gpu: the fake device is gone")

    def warm(self) -> None:
        with open(self.gone + ".warms", "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()}\n")
        self._check()

    def recognise_pages(self, pages: list[Any]) -> list[PageResult]:
        self._check()
        return [PageResult(index=p.index, width=p.width, height=p.height, blocks=[], markdown="")
                for p in pages]

    def finish_document(self, pages: list[PageResult]) -> list[PageResult]:
        return pages

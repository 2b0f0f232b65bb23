"""A FAKE of PaddleOCR 3.x's `PaddleOCRVL` pipeline, for tests without Paddle or a GPU.

It has the real interface the engine uses (`PaddleOCRVL(**kwargs)`, `predict(list of BGR
arrays)`, `restructure_pages(res_list, merge_tables, relevel_titles, concatenate_pages)`)
and answers in PaddleOCR-VL's documented JSON shape. It reads nothing: the page content
is made up from the image size. What makes it useful is how it misbehaves, chosen by the
colour of a page's top-left pixel (RGB):

    red (255, 0, 0)       hang for an hour, as Paddle does on some images
    green (0, 255, 0)     os.abort(), as native code does on some pages
    blue (0, 0, 255)      leak 300 MB of host memory and keep it
    magenta (255, 0, 255) SIGKILL the daemon (the parent): a page that takes the pod down
    yellow (255, 255, 0)  raise ValueError, as the pipeline does on a bad input
    cyan (0, 255, 255)    raise a connection error, as its VLM client does when vLLM is down

If FAKE_PADDLEOCR_LOG names a file, every call appends a JSON line there (the pipeline
runs in a worker process, so the test reads what happened from the file).

The device, as PaddleX 3.7 treats it (paddlex/utils/flags.py and PaddlePredictorOption.
setdefault_by_model_name in paddlex/inference/models/runners/paddle_static/config/
pp_option.py): FAKE_PADDLE_GPUS is how many GPUs the fake "Paddle" sees (default 1).
With a `gpu` device and none seen, the pipeline raises PaddleX's RuntimeError when
PADDLE_PDX_DISABLE_DEVICE_FALLBACK was true at import (read once, at import, as PaddleX
reads its flags), and otherwise falls back to the CPU quietly, as PaddleX does.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import numpy as np

WARMUP_SIZE = (640, 200)
_leaks: list[bytearray] = []


def _flag(value: object) -> bool:
    # paddlex.utils.flags.get_flag_from_env_var, for a boolean flag.
    return value in (True, "True", "true", "TRUE", "1")


# Read at import, as PaddleX reads its flags: setting it later changes nothing.
DISABLE_DEVICE_FALLBACK = _flag(os.environ.get("PADDLE_PDX_DISABLE_DEVICE_FALLBACK", False))


def _log(event: str, **fields: Any) -> None:
    path = os.environ.get("FAKE_PADDLEOCR_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")


class FakeResult:
    """`.json` and `.markdown` as PaddleOCR-VL result objects have them."""

    def __init__(self, res: dict[str, Any]) -> None:
        self.json = {"res": res}
        self.markdown = {"markdown_texts": None, "markdown_images": {}}


def _page(width: int, height: int, blocks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"input_path": None, "page_index": None, "page_count": None, "width": width,
            "height": height, "model_settings": {"use_doc_preprocessor": False,
                                                 "use_layout_detection": True},
            "parsing_res_list": blocks}


def _block(n: int, label: str, content: str, bbox: list[int]) -> dict[str, Any]:
    return {"block_label": label, "block_content": content, "block_bbox": bbox,
            "block_id": n, "block_order": n + 1, "group_id": n}


def _misbehave(rgb: tuple[int, int, int]) -> None:
    if rgb == (255, 0, 0):
        time.sleep(3600)
    elif rgb == (0, 255, 0):
        os.abort()
    elif rgb == (0, 0, 255):
        _leaks.append(bytearray(b"\x01") * (300 * 1024 * 1024))
    elif rgb == (255, 0, 255):
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(3600)
    elif rgb == (255, 255, 0):
        raise ValueError("fake pipeline: cannot process this image")
    elif rgb == (0, 255, 255):
        raise RuntimeError("Connection error.") from ConnectionRefusedError(111, "Connection refused")


class PaddleOCRVL:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        device = str(kwargs.get("device") or "")
        gpus = int(os.environ.get("FAKE_PADDLE_GPUS", "1"))
        _log("init", kwargs=sorted(kwargs), device=device, fallback_disabled=DISABLE_DEVICE_FALLBACK,
             gpus=gpus)
        if device.split(":")[0].lower() == "gpu" and gpus == 0:
            if DISABLE_DEVICE_FALLBACK:
                # PaddleX 3.7's exact error.
                raise RuntimeError(
                    "Device fallback is disabled and the specified device (GPU) is not available. "
                    "To fall back to CPU instead, unset the PADDLE_PDX_DISABLE_DEVICE_FALLBACK "
                    "environment variable."
                )
            _log("device_fallback", device="cpu")  # PaddleX only logs a warning

    def predict(self, input: list[np.ndarray]) -> list[FakeResult]:
        _log("predict", pages=len(input))
        out = []
        for image in input:
            height, width = image.shape[:2]
            b, g, r = (int(v) for v in image[0, 0, :3])
            _misbehave((r, g, b))
            if (width, height) == WARMUP_SIZE:
                out.append(FakeResult(_page(width, height, [
                    _block(0, "text", "WATCHER WARMUP 2026", [40, 70, 520, 120])])))
                continue
            out.append(FakeResult(_page(width, height, [
                _block(0, "doc_title", "Fake PaddleOCR-VL page", [40, 40, width - 40, 90]),
                _block(1, "text", f"A page of {width}x{height} pixels.", [40, 120, width - 40, 160]),
                _block(2, "table", "<table><tr><td>a</td><td>b</td></tr></table>",
                       [40, 200, width - 40, 260]),
            ])))
        return out

    def restructure_pages(self, res_list: list[dict[str, Any]], merge_tables: bool = True,
                          relevel_titles: bool = True, concatenate_pages: bool = False) -> list[Any]:
        _log("restructure", pages=len(res_list), merge_tables=merge_tables,
             relevel_titles=relevel_titles, concatenate_pages=concatenate_pages)
        out = []
        counter = 0
        for item in res_list:
            res = json.loads(json.dumps(item["res"]))
            for block in res["parsing_res_list"]:
                block["global_block_id"] = counter
                counter += 1
            out.append(FakeResult(res))
        return out

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

With FAKE_PADDLEOCR_SEND_BLOCKS=1 it also talks to the VLM server as the real pipeline
does (PaddleX's paddleocr_vl pipeline and DocVLMGenAIClientPredictor): for the pages of
one `predict` call it first "detects the layout" (FAKE_PADDLEOCR_LAYOUT_SECONDS per page,
default 0), then sends every text and table block of all of them to
`vl_rec_server_url`/chat/completions at once, at most `vl_rec_max_concurrency` at a time,
one block crop per request (PNG; the "OCR:" or "Table Recognition:" prompt), and waits for
them all before it answers: one wave of requests per call. FAKE_PADDLEOCR_BLOCKS sets the
blocks per page (default 3: a title, a paragraph and a table). The block text is what the
server answered. bench/vlm_utilisation.py --engine paddleocr-vl runs it against
bench/gpu_sim.py.

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

import base64
import io
import json
import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

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


def _blocks(width: int, height: int) -> list[dict[str, Any]]:
    count = int(os.environ.get("FAKE_PADDLEOCR_BLOCKS", "3"))
    blocks = [_block(0, "doc_title", "Fake PaddleOCR-VL page", [40, 40, width - 40, 90]),
              _block(1, "text", f"A page of {width}x{height} pixels.", [40, 120, width - 40, 160]),
              _block(2, "table", "<table><tr><td>a</td><td>b</td></tr></table>",
                     [40, 200, width - 40, 260])][:count]
    row = max(1, (height - 300) // max(1, count))
    for n in range(len(blocks), count):
        top = min(height - 2, 280 + (n - 3) * row)
        blocks.append(_block(n, "text", f"Paragraph {n}.", [40, top, width - 40, min(height, top + row)]))
    return blocks


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

    def predict(self, input: list[np.ndarray], **kwargs: Any) -> list[FakeResult]:
        _log("predict", pages=len(input), kwargs=kwargs)
        pages = []
        for image in input:
            height, width = image.shape[:2]
            b, g, r = (int(v) for v in image[0, 0, :3])
            _misbehave((r, g, b))
            if (width, height) == WARMUP_SIZE:
                pages.append(_page(width, height, [
                    _block(0, "text", "WATCHER WARMUP 2026", [0, 0, width, height])]))
            else:
                pages.append(_page(width, height, _blocks(width, height)))
        if os.environ.get("FAKE_PADDLEOCR_SEND_BLOCKS") == "1":
            time.sleep(float(os.environ.get("FAKE_PADDLEOCR_LAYOUT_SECONDS", "0")) * len(input))
            self._send_blocks(input, pages)
        return [FakeResult(page) for page in pages]

    def _send_blocks(self, images: list[np.ndarray], pages: list[dict[str, Any]]) -> None:
        blocks = [(image, block) for image, page in zip(images, pages, strict=True)
                  for block in page["parsing_res_list"]]
        workers = int(self.kwargs.get("vl_rec_max_concurrency") or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            answers = list(pool.map(lambda item: self._ask(*item), blocks))
        for (_image, block), text in zip(blocks, answers, strict=True):
            block["block_content"] = text

    def _ask(self, image: np.ndarray, block: dict[str, Any]) -> str:
        x0, y0, x1, y1 = (int(v) for v in block["block_bbox"])
        crop = Image.fromarray(np.ascontiguousarray(image[y0:y1, x0:x1, ::-1]))
        with io.BytesIO() as buf:
            crop.save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        prompt = "Table Recognition:" if block["block_label"] == "table" else "OCR:"
        body = {"model": self.kwargs.get("vl_rec_api_model_name"), "temperature": 0,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": prompt}]}]}
        request = urllib.request.Request(
            str(self.kwargs["vl_rec_server_url"]).rstrip("/") + "/chat/completions",
            data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
        return str(answer["choices"][0]["message"]["content"])

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

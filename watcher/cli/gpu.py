"""The GPU probes of `watcher check` (WATCHER_ENGINE=paddleocr-vl): the GPU that nvidia-smi
reports against what the image needs, and whether Paddle, which runs the layout model,
sees it.

What the image needs (see the Dockerfile): a driver for CUDA 12 — 525.60.13 or newer runs
the CUDA 12.6 (Paddle) and 12.8 (torch under vLLM) libraries through CUDA's minor-version
compatibility, 570 or newer runs CUDA 12.8 natively — and compute capability 7.0 or newer
(vLLM's floor, and the oldest the torch CUDA 12.8 wheels are built for).

Each probe gives a `Finding`: `ok`, `warn` (works, with a caveat worth acting on), `FAIL`
or `skip` (nothing to look at here: no nvidia-smi, no paddle). Both run their command in
a subprocess with a timeout, so a wedged driver cannot hang the check.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import re
import shutil
import sys
from dataclasses import dataclass

QUERY_FIELDS = "name,driver_version,memory.total,compute_cap"
# Drivers older than 510 do not know the compute_cap field.
QUERY_FIELDS_OLD = "name,driver_version,memory.total"
MIN_DRIVER = (525, 60, 13)
NATIVE_DRIVER = (570,)
MIN_COMPUTE_CAPABILITY = (7, 0)
# deploy/cloudru-ml-inference.md sizes the VLM server's defaults for 24 GB cards or larger
# (those report about 22.5 GiB); well below that, the defaults may not fit.
SMALL_GPU_MIB = 20 * 1024
NVIDIA_SMI_TIMEOUT = 20.0
PADDLE_TIMEOUT = 120.0
NEEDS = ("the image needs driver >= 525.60.13 (570 or newer for CUDA 12.8 natively) "
         "and compute capability >= 7.0")

_RANK = {"ok": 0, "warn": 1, "FAIL": 2}


@dataclass(frozen=True)
class Finding:
    state: str  # ok, warn, FAIL, skip
    detail: str


def version_tuple(text: str) -> tuple[int, ...] | None:
    """"570.124.06" -> (570, 124, 6); None for anything that is not dotted numbers."""
    if not re.fullmatch(r"\d+(\.\d+)*", text.strip()):
        return None
    return tuple(int(part) for part in text.strip().split("."))


def _gib(memory: str) -> tuple[str, float | None]:
    """nvidia-smi's "81559 MiB" as "79.6 GiB" and the MiB; other text as it is."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*MiB", memory.strip())
    if not match:
        return memory.strip() or "memory not reported", None
    mib = float(match.group(1))
    return f"{mib / 1024:.1f} GiB", mib


def judge_gpu(fields: list[str]) -> Finding:
    """One GPU's line of the nvidia-smi query (name, driver, memory[, compute capability])."""
    name, driver, memory = fields[0], fields[1], fields[2]
    capability = fields[3] if len(fields) > 3 else "not reported"
    shown_memory, mib = _gib(memory)
    detail = f"{name}, {shown_memory}, driver {driver}, compute capability {capability}"
    fails: list[str] = []
    warns: list[str] = []
    driver_version = version_tuple(driver)
    if driver_version is None:
        fails.append(f"cannot read the driver version {driver!r}")
    elif driver_version < MIN_DRIVER:
        fails.append(f"driver {driver} is older than 525.60.13, the oldest that runs the image's "
                     "CUDA 12 libraries: upgrade the NVIDIA driver")
    elif driver_version < NATIVE_DRIVER:
        warns.append(f"driver {driver} runs the image's CUDA 12.8 (torch under vLLM) only through "
                     "CUDA's minor-version compatibility, which does not cover kernels compiled "
                     "at run time from PTX; 570 or newer runs it natively")
    cc = version_tuple(capability)
    if cc is None:
        warns.append("compute capability not reported; the image needs 7.0 or newer")
    elif cc < MIN_COMPUTE_CAPABILITY:
        fails.append(f"compute capability {capability} is below 7.0, the oldest that the image's "
                     "vLLM and torch (CUDA 12.8 wheels) run on: use a Volta (V100) or newer GPU")
    if mib is not None and mib < SMALL_GPU_MIB:
        warns.append(f"{shown_memory} is less than the 24 GB cards the VLM server's defaults are "
                     "sized for: lower WATCHER_VLM_MAX_MODEL_LEN or WATCHER_VLM_MAX_NUM_SEQS if "
                     "vLLM runs out of memory")
    if fails:
        return Finding("FAIL", "; ".join([detail, *fails]))
    if warns:
        return Finding("warn", "; ".join([detail, *warns]))
    return Finding("ok", detail)


async def _run(argv: list[str], timeout: float) -> tuple[int | None, str, str]:
    """Exit status (None: timed out, killed), stdout and stderr of a command."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return None, "", ""
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _last_line(*texts: str) -> str:
    lines = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


async def nvidia_smi_finding(timeout: float = NVIDIA_SMI_TIMEOUT) -> Finding:
    """The GPUs that nvidia-smi lists, each against what the image needs; the worst wins."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return Finding("skip", "nvidia-smi not found: no NVIDIA GPU on this machine, or a container "
                               "started without one (docker --gpus, Kubernetes nvidia.com/gpu); "
                               "the paddleocr-vl engine needs one for vLLM and the layout model")
    query = QUERY_FIELDS
    code, out, err = await _run([exe, f"--query-gpu={query}", "--format=csv,noheader"], timeout)
    if code not in (0, None) and "compute_cap" in out + err:
        query = QUERY_FIELDS_OLD
        code, out, err = await _run([exe, f"--query-gpu={query}", "--format=csv,noheader"], timeout)
    if code is None:
        return Finding("FAIL", f"nvidia-smi gave no answer within {timeout:g} s: the driver may be "
                               "wedged; the GPU is not usable")
    if code != 0:
        return Finding("FAIL", f"nvidia-smi failed (exit {code}): {_last_line(out, err)}")
    rows = [[field.strip() for field in line.split(",")] for line in out.splitlines() if line.strip()]
    width = len(query.split(","))
    if not rows:
        return Finding("FAIL", "nvidia-smi lists no GPU")
    if any(len(row) < width for row in rows):
        return Finding("FAIL", f"cannot read nvidia-smi's answer: {_last_line(out)}")
    # A comma inside a GPU's name must not shift the fields after it.
    findings = [judge_gpu([", ".join(row[:len(row) - width + 1]), *row[len(row) - width + 1:]])
                for row in rows]
    state = max((f.state for f in findings), key=_RANK.__getitem__)
    detail = (findings[0].detail if len(findings) == 1 else
              "; ".join(f"GPU {i}: {f.detail}" for i, f in enumerate(findings)))
    return Finding(state, f"{detail} ({NEEDS})" if state == "ok" else detail)


PADDLE_PROBE = (
    "import json, paddle\n"
    "print(json.dumps({'version': paddle.__version__,\n"
    "                  'cuda': bool(paddle.device.is_compiled_with_cuda()),\n"
    "                  'count': int(paddle.device.cuda.device_count())}))\n"
)


def _device_index(device: str) -> int:
    """The first GPU index of a device string (`gpu` and `gpu:0` are 0, `gpu:1,2` is 1)."""
    _, _, ids = device.partition(":")
    return int(ids.split(",")[0]) if ids else 0


async def paddle_finding(layout_device: str, timeout: float = PADDLE_TIMEOUT) -> Finding:
    """Whether Paddle sees the GPU the layout model is told to use (a fresh interpreter, so
    that importing Paddle can neither hang nor crash the check)."""
    if importlib.util.find_spec("paddle") is None:
        return Finding("skip", "paddle is not importable here: the paddleocr-vl engine's workers need "
                               "paddlepaddle-gpu (the image has it); run the check inside the image")
    code, out, err = await _run([sys.executable, "-c", PADDLE_PROBE], timeout)
    if code is None:
        return Finding("FAIL", f"importing paddle did not finish within {timeout:g} s")
    report = None
    for line in reversed(out.splitlines()):  # paddle may print notices of its own
        with contextlib.suppress(ValueError):
            candidate = json.loads(line)
            if isinstance(candidate, dict):
                report = candidate
                break
    if code != 0 or report is None:
        return Finding("FAIL", f"paddle cannot report its GPUs (exit {code}): {_last_line(err, out)}")
    version, cuda, count = report.get("version"), report.get("cuda"), report.get("count")
    gpu = layout_device.split(":", 1)[0].lower() == "gpu"
    setting = f"WATCHER_LAYOUT_DEVICE={layout_device}"
    if not cuda:
        seen = f"paddle {version} is built without CUDA (the paddlepaddle CPU wheel)"
        if gpu:
            return Finding("FAIL", f"{seen}: with {setting} the engine's warm-up fails; install "
                                   "paddlepaddle-gpu, or set WATCHER_LAYOUT_DEVICE=cpu")
        return Finding("ok", f"{seen}; {setting} does not need a GPU")
    seen = f"paddle {version} (CUDA build) sees {count} GPU{'' if count == 1 else 's'}"
    if not gpu:
        return Finding("ok", f"{seen}; {setting} does not use one")
    if not isinstance(count, int) or count <= _device_index(layout_device):
        return Finding("FAIL", f"{seen}: with {setting} the engine's warm-up fails (device fallback "
                               "is disabled); check the driver (above) and that the container has "
                               "the GPU, or set WATCHER_LAYOUT_DEVICE=cpu")
    return Finding("ok", seen)

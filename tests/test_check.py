"""`watcher check` against the real SeaweedFS: what passes, and each failure named."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import lenient_store
from vlm_fake import FakeVlmServer

from watcher.cli import gpu
from watcher.cli.check import Checker, Probe
from watcher.cli.embedded import SeaweedS3
from watcher.core.settings import load_settings

pytestmark = pytest.mark.e2e  # `watcher check` in subprocesses


def env_for(weed: SeaweedS3, bucket: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLOUDRU_", "WATCHER_"))}
    env.update(CLOUDRU_S3_ENDPOINT=weed.endpoint, CLOUDRU_S3_BUCKET=bucket,
               CLOUDRU_S3_ACCESS_KEY=weed.access_key, CLOUDRU_S3_SECRET_KEY=weed.secret_key)
    env.update(extra)
    return env


def check_cli(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "watcher", "check"], env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_ready_configuration_passes_every_probe(weed: SeaweedS3, bucket: str, s3: Any) -> None:
    proc = check_cli(env_for(weed, bucket))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 8 and all(line.startswith("ok ") for line in lines), lines
    assert "conditional requests" in proc.stdout and "Tesseract rus+eng" in proc.stdout
    # Its probe objects are gone.
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_a_wrong_secret_is_named_and_the_rest_skipped(weed: SeaweedS3, bucket: str) -> None:
    wrong = "not-the-secret-0f3c9a"
    proc = check_cli(env_for(weed, bucket, CLOUDRU_S3_SECRET_KEY=wrong))
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("FAIL S3") and "SignatureDoesNotMatch" in lines[0]
    assert "CLOUDRU_S3_SECRET_KEY" in lines[0]
    assert all(line.startswith("skip") for line in lines[1:-1]), lines
    assert wrong not in proc.stdout + proc.stderr


def test_bad_settings_exit_2_before_probing(weed: SeaweedS3, bucket: str) -> None:
    proc = check_cli(env_for(weed, bucket, WATCHER_HTTP_PORT="eighty"))
    assert proc.returncode == 2 and "WATCHER_HTTP_PORT" in proc.stderr and proc.stdout == ""


async def run_checker(weed: SeaweedS3, bucket: str, endpoint: str | None = None, **values: Any) -> Checker:
    settings = load_settings(s3_endpoint=endpoint or weed.endpoint, s3_bucket=bucket,
                             s3_access_key=weed.access_key, s3_secret_key=weed.secret_key,
                             s3_max_attempts=1, **values)
    checker = Checker(settings)
    await checker.run()
    return checker


def by_state(checker: Checker) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for probe in checker.probes:
        found.setdefault(probe.state, []).append(f"{probe.what}: {probe.detail}")
    return found


async def test_a_missing_bucket_and_an_absent_vlm_server_are_named(weed: SeaweedS3) -> None:
    checker = await run_checker(weed, "no-such-bucket-here", engine="openai-vlm",
                                vlm_url="http://127.0.0.1:9/v1")
    failed = by_state(checker)["FAIL"]
    assert any("bucket 'no-such-bucket-here'" in f and "CLOUDRU_S3_BUCKET" in f for f in failed)
    assert any("engine openai-vlm" in f and "WATCHER_VLM_URL" in f for f in failed)
    assert checker.probes[0].state == "ok"  # the credentials themselves are fine


async def test_a_store_that_ignores_conditional_writes_is_told_to_use_shards(
    weed: SeaweedS3, bucket: str
) -> None:
    async with lenient_store(weed) as endpoint:
        checker = await run_checker(weed, bucket, endpoint=endpoint)
    failed = by_state(checker).get("FAIL", [])
    assert len(failed) == 1 and "conditional requests" in failed[0], failed
    assert "WATCHER_CLAIM_MODE=shard" in failed[0]


# --- the GPU, for WATCHER_ENGINE=paddleocr-vl ----------------------------------------------
GPU_QUERY = "--query-gpu=name,driver_version,memory.total,compute_cap"
OLD_GPU_QUERY = "--query-gpu=name,driver_version,memory.total"
NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.")


def fake_nvidia_smi(bin_dir: Path, answers: dict[str, tuple[str, int]]) -> None:
    """A FAKE `nvidia-smi`: prints the given output and exits with the given code for each
    `--query-gpu=...` it knows (with `--format=csv,noheader`); anything else is exit 2."""
    bin_dir.mkdir(exist_ok=True)
    cases = "".join(
        f"  '{query} --format=csv,noheader')\n    printf '%s' {shlex.quote(out)}\n    exit {code} ;;\n"
        for query, (out, code) in answers.items())
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\n# A FAKE nvidia-smi (tests/test_check.py).\n"
                      f'case "$*" in\n{cases}esac\n'
                      'echo "fake nvidia-smi: unexpected arguments: $*" >&2\nexit 2\n')
    script.chmod(0o755)


FAKE_PADDLE = '''"""A FAKE `paddle` (tests/test_check.py): only what `watcher check` asks of it, with
FAKE_PADDLE_GPUS GPUs seen."""
import os

__version__ = "3.3.0"


class device:
    class cuda:
        @staticmethod
        def device_count():
            return int(os.environ.get("FAKE_PADDLE_GPUS", "1"))

    @staticmethod
    def is_compiled_with_cuda():
        return True
'''


@pytest.fixture
async def vlm() -> AsyncIterator[FakeVlmServer]:
    server = await FakeVlmServer().start()
    yield server
    await server.stop()


async def gpu_check(weed: SeaweedS3, bucket: str, vlm: FakeVlmServer,
                    **values: Any) -> tuple[int, dict[str, Probe]]:
    settings = load_settings(s3_endpoint=weed.endpoint, s3_bucket=bucket, s3_access_key=weed.access_key,
                             s3_secret_key=weed.secret_key, s3_max_attempts=1, engine="paddleocr-vl",
                             vlm_url=vlm.url, **values)
    checker = Checker(settings)
    code = await checker.run()
    others = [p for p in checker.probes if not p.what.startswith(("GPU", "Paddle"))]
    assert all(p.state == "ok" for p in others), [p.line() for p in others]
    return code, {p.what.split()[0]: p for p in checker.probes if p.what.startswith(("GPU", "Paddle"))}


def without_paddle() -> None:
    if importlib.util.find_spec("paddle") is not None:
        pytest.skip("paddle is installed here: its absence cannot be checked")


@pytest.mark.parametrize(("answer", "state", "words", "code"), [
    ("NVIDIA H200, 570.124.06, 143771 MiB, 9.0", "ok",
     ["NVIDIA H200, 140.4 GiB, driver 570.124.06, compute capability 9.0", "525.60.13"], 0),
    ("NVIDIA A10, 535.183.01, 23028 MiB, 8.6", "warn",
     ["driver 535.183.01", "minor-version compatibility", "570 or newer"], 0),
    ("Tesla T4, 470.256.02, 15360 MiB, 7.5", "FAIL",
     ["driver 470.256.02 is older than 525.60.13", "upgrade the NVIDIA driver"], 1),
    ("NVIDIA GeForce GTX 1080 Ti, 570.133.07, 11264 MiB, 6.1", "FAIL",
     ["compute capability 6.1 is below 7.0"], 1),
    ("NVIDIA L4, 570.124.06, 23034 MiB, 8.9\nTesla P40, 570.124.06, 23040 MiB, 6.1", "FAIL",
     ["GPU 0: NVIDIA L4", "GPU 1: Tesla P40", "compute capability 6.1 is below 7.0"], 1),
], ids=["good", "driver-535-warns", "old-driver", "compute-6.1", "one-of-two-too-old"])
async def test_the_gpu_is_judged_against_what_the_image_needs(
    weed: SeaweedS3, bucket: str, vlm: FakeVlmServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    answer: str, state: str, words: list[str], code: int,
) -> None:
    without_paddle()
    fake_nvidia_smi(tmp_path / "bin", {GPU_QUERY: (answer + "\n", 0)})
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    exit_code, found = await gpu_check(weed, bucket, vlm)
    gpu = found["GPU"]
    assert gpu.state == state, gpu.line()
    assert all(word in gpu.detail for word in words), gpu.line()
    assert found["Paddle"].state == "skip" and "paddle is not importable" in found["Paddle"].detail
    assert exit_code == code  # warn and skip lines pass; FAIL does not


async def test_nvidia_smi_failing_absent_or_too_old_to_know_compute_capability(
    weed: SeaweedS3, bucket: str, vlm: FakeVlmServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    without_paddle()
    fake_nvidia_smi(tmp_path / "failing", {GPU_QUERY: (NO_DRIVER + "\n", 9)})
    monkeypatch.setenv("PATH", str(tmp_path / "failing"))
    exit_code, found = await gpu_check(weed, bucket, vlm)
    assert found["GPU"].state == "FAIL" and exit_code == 1
    assert found["GPU"].detail == f"nvidia-smi failed (exit 9): {NO_DRIVER}"

    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    exit_code, found = await gpu_check(weed, bucket, vlm)
    assert found["GPU"].state == "skip" and found["GPU"].detail.startswith("nvidia-smi not found")
    assert found["GPU"].line().startswith("skip GPU") and exit_code == 0

    # Drivers before 510 refuse the compute_cap field: asked again without it.
    fake_nvidia_smi(tmp_path / "old", {
        GPU_QUERY: ('Field "compute_cap" is not a valid field to query.\n', 2),
        OLD_GPU_QUERY: ("Tesla K80, 470.82.01, 11441 MiB\n", 0)})
    monkeypatch.setenv("PATH", str(tmp_path / "old"))
    exit_code, found = await gpu_check(weed, bucket, vlm)
    assert found["GPU"].state == "FAIL" and "driver 470.82.01 is older than 525.60.13" in found["GPU"].detail
    assert "compute capability not reported" in found["GPU"].detail


async def test_paddle_is_asked_in_a_subprocess_whether_it_sees_the_layout_models_gpu(
    weed: SeaweedS3, bucket: str, vlm: FakeVlmServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_nvidia_smi(tmp_path / "bin", {GPU_QUERY: ("NVIDIA H200, 570.124.06, 143771 MiB, 9.0\n", 0)})
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "site" / "paddle").mkdir(parents=True)
    (tmp_path / "site" / "paddle" / "__init__.py").write_text(FAKE_PADDLE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))  # found here, imported in the subprocess
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))

    monkeypatch.setenv("FAKE_PADDLE_GPUS", "1")
    exit_code, found = await gpu_check(weed, bucket, vlm)
    assert found["Paddle"].state == "ok" and exit_code == 0, found["Paddle"].line()
    assert found["Paddle"].detail == "paddle 3.3.0 (CUDA build) sees 1 GPU"

    monkeypatch.setenv("FAKE_PADDLE_GPUS", "0")
    exit_code, found = await gpu_check(weed, bucket, vlm)
    assert found["Paddle"].state == "FAIL" and exit_code == 1
    assert "WATCHER_LAYOUT_DEVICE=gpu the engine's warm-up fails" in found["Paddle"].detail
    assert found["Paddle"].what.endswith("(WATCHER_LAYOUT_DEVICE=gpu)")

    exit_code, found = await gpu_check(weed, bucket, vlm, layout_device="cpu")
    assert found["Paddle"].state == "ok" and exit_code == 0
    assert "WATCHER_LAYOUT_DEVICE=cpu does not use one" in found["Paddle"].detail


def test_the_gpu_lines_come_from_watcher_check_itself(weed: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    fake_nvidia_smi(tmp_path / "bin", {GPU_QUERY: ("NVIDIA A10, 535.183.01, 23028 MiB, 8.6\n", 0)})
    env = env_for(weed, bucket, WATCHER_ENGINE="paddleocr-vl", WATCHER_VLM_URL="http://127.0.0.1:9/v1",
                  PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    proc = check_cli(env)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1  # no VLM server at port 9
    assert lines[-2].startswith("warn GPU (nvidia-smi) for the image: NVIDIA A10, 22.5 GiB"), lines
    assert lines[-1].startswith(("skip Paddle", "ok   Paddle", "FAIL Paddle")), lines


async def test_a_hanging_nvidia_smi_is_given_up_after_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n# A FAKE nvidia-smi that hangs, as on a wedged driver.\n"
                                        "exec sleep 60\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    started = time.monotonic()
    finding = await gpu.nvidia_smi_finding(timeout=0.5)
    assert time.monotonic() - started < 10
    assert finding == gpu.Finding("FAIL", "nvidia-smi gave no answer within 0.5 s: the driver may be "
                                          "wedged; the GPU is not usable")

"""What the GPU image installs, resolved against the package index without building it.

No GPU and no Docker here, but pip's index is reachable: each `pip install` the
Dockerfile runs is resolved with `pip install --dry-run --report`, with the image's
Python version and the same options (--only-binary, --uploaded-prior-to), from the pins
the Dockerfile itself holds (its ARGs). The reports then show what the image relies on:

- the VLM server's environment has a vLLM that serves PaddleOCR-VL natively: at least the
  first version PaddleX (the client the daemon runs) records for the served model, and
  with that model's architecture in the vLLM wheel's own model registry;
- torch is a CUDA build and every CUDA wheel beside it has torch's CUDA major;
- each environment has exactly one OpenCV distribution (they all write `cv2/`);
- the daemon's environment has the PaddleOCR the image pins, the served model name the
  daemon asks for is one PaddleX knows, and the weights the image bakes are that model's.

Paddle's own index (paddlepaddle-gpu) is not reachable from here, and pip's has no
paddlepaddle-gpu 3.x: the daemon's environment is resolved with the CPU `paddlepaddle`
wheel of the same version in its place, which declares the same Python dependencies
except the nvidia-* CUDA wheels. So Paddle's CUDA wheels are the one part not checked
here (deploy/gpu-check.sh runs `paddle.utils.run_check()` on a GPU).

The two resolutions run side by side and take about a minute; files are read from the
wheels in the reports with HTTP range requests (a few hundred kilobytes, not the wheels).
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from deployfiles import REPO, PipInstall, arg_defaults, copy_context, instructions, pip_installs
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from watcher.core.settings import PADDLEOCR_VL_MODELS

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]  # the package index

VLLM_ENV = "/opt/vllm"
DAEMON_ENV = "/opt/venv"
OPENCV = {"opencv-python", "opencv-python-headless", "opencv-contrib-python",
          "opencv-contrib-python-headless"}


@dataclass
class Resolved:
    """One environment's `pip install --dry-run --report`."""

    report: dict[str, Any]

    def dists(self) -> dict[str, dict[str, Any]]:
        return {canonicalize_name(item["metadata"]["name"]): item for item in self.report["install"]}

    def version(self, name: str) -> Version:
        return Version(self.dists()[canonicalize_name(name)]["metadata"]["version"])

    def url(self, name: str) -> str:
        url: str = self.dists()[canonicalize_name(name)]["download_info"]["url"]
        return url

    def requires(self, name: str) -> list[Requirement]:
        metadata = self.dists()[canonicalize_name(name)]["metadata"]
        return [Requirement(r) for r in metadata.get("requires_dist", [])]


class RemoteFile(io.RawIOBase):
    """A read-only, seekable file over HTTP range requests: zipfile reads a wheel's
    directory and one member without downloading the rest."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url, self.pos = url, 0
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
            self.size = int(r.headers["Content-Length"])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        return self.pos

    def readinto(self, buffer: Any) -> int:
        if self.pos >= self.size:
            return 0
        end = min(self.size, self.pos + len(buffer)) - 1
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end}"})
        with urllib.request.urlopen(request, timeout=120) as r:
            data = r.read()
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def wheel(url: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BufferedReader(RemoteFile(url), buffer_size=1 << 20))


def pip_environment() -> dict[str, str]:
    """This machine's environment without its pip configuration: the resolution sees the
    package index as the image build does, not local wheel folders or constraints."""
    keep = {"PIP_CERT", "PIP_INDEX_URL", "PIP_DEFAULT_TIMEOUT"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in keep}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def image_pip(installs: list[PipInstall], where: Path) -> list[str]:
    """The pip the image upgrades to before its installs (their options need it), run from
    its wheel: this machine's own pip may be older."""
    pins = {r for install in installs for r in install.requirements
            if not r.startswith("/") and Requirement(r).name == "pip"}
    assert len(pins) == 1, f"one pip version for both environments: {pins}"
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary", ":all:", "--dest", str(where), *pins],
                   env=pip_environment(), check=True, timeout=120)
    (found,) = where.glob("pip-*.whl")
    return [sys.executable, str(found / "pip")]


def dry_run_command(pip: list[str], installs: list[PipInstall], python_version: str, app: Path,
                    paddle_index: str, report: Path) -> list[str]:
    """One resolution for everything an environment's installs put in it, in order."""
    requirements: list[str] = []
    options: dict[str, str] = {}
    for install in installs:
        if all(Requirement(r).name == "pip" for r in install.requirements):
            continue  # the pip upgrade that makes the next options available
        assert "extra-index-url" not in install.options, "an extra index mixes indexes for every package"
        if install.options.get("index-url") == paddle_index:
            # Paddle's index, unreachable here: the CPU wheel of the same version instead.
            assert install.requirements, install
            for text in install.requirements:
                req = Requirement(text)
                assert req.name == "paddlepaddle-gpu", f"only Paddle comes from Paddle's index: {text}"
                requirements.append(f"paddlepaddle{req.specifier}")
            continue
        assert "index-url" not in install.options, install
        # --python-version needs wheels only; the image installs wheels only too.
        assert install.options.get("only-binary") == ":all:", install
        options.update(install.options)
        for text in install.requirements:
            requirements.append(str(app) if text.startswith("/app") else text)
    command = [*pip, "install", "--dry-run", "--ignore-installed",
               "--quiet", "--report", str(report), "--python-version", python_version]
    for key, value in options.items():
        command += [f"--{key}", value]
    return command + requirements


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Resolved]:
    instrs = instructions()
    args = arg_defaults(instrs)
    tmp = tmp_path_factory.mktemp("image")
    app = copy_context(instrs, tmp / "root") / "app"
    installs = pip_installs(instrs, args)
    pip = image_pip(installs, tmp / "pip")
    by_env: dict[str, list[PipInstall]] = {}
    for install in installs:
        by_env.setdefault(install.venv, []).append(install)
    assert set(by_env) == {VLLM_ENV, DAEMON_ENV}, by_env
    procs = {}
    for venv, group in by_env.items():
        report = tmp / f"{PurePosixPath(venv).name}.json"
        command = dry_run_command(pip, group, args["PYTHON_VERSION"], app, args["PADDLE_INDEX_URL"], report)
        procs[venv] = (report, command, subprocess.Popen(
            command, env=pip_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, cwd=tmp))
    result = {}
    for venv, (report, command, proc) in procs.items():
        output, _ = proc.communicate(timeout=540)
        assert proc.returncode == 0, f"{' '.join(command)}\n{output}"
        result[venv] = Resolved(json.loads(report.read_text()))
    return result


@pytest.fixture(scope="module")
def args() -> dict[str, str]:
    return arg_defaults(instructions())


@pytest.fixture(scope="module")
def paddlex_vllm_facts(resolved: dict[str, Resolved]) -> tuple[dict[str, Any], set[str]]:
    """From the paddlex wheel the daemon's environment gets: the first vLLM version that
    serves each PaddleOCR-VL model natively, and the architecture names of PaddleX's own
    vLLM model classes (which it registers under their class name for the architecture in
    the weights' config.json, on older vLLMs)."""
    with wheel(resolved[DAEMON_ENV].url("paddlex")) as whl:
        models = "paddlex/inference/genai/models/__init__.py"
        tree = ast.parse(whl.read(models).decode())
        info = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", None) == "ALL_MODEL_INFO" for t in node.targets))
        architectures = set()
        for name in whl.namelist():
            if name.startswith("paddlex/inference/genai/models/") and name.endswith("_vllm.py"):
                architectures |= set(re.findall(r"class (\w+ForConditionalGeneration)\(",
                                                whl.read(name).decode()))
    assert architectures, "no vLLM model class found in paddlex"
    return info, architectures


def test_vllm_is_the_pinned_one_and_serves_the_model_natively(
    resolved: dict[str, Resolved], args: dict[str, str],
    paddlex_vllm_facts: tuple[dict[str, Any], set[str]],
) -> None:
    vllm = resolved[VLLM_ENV].version("vllm")
    assert vllm == Version(args["VLLM_VERSION"])
    info, architectures = paddlex_vllm_facts
    served, _ = PADDLEOCR_VL_MODELS[args["PIPELINE_VERSION"]]
    assert served in info, f"PaddleX does not know {served}"
    assert vllm >= Version(info[served]["min_vllm_version"]), (vllm, info[served])
    # ... and the wheel itself has the architecture in its registry.
    with wheel(resolved[VLLM_ENV].url("vllm")) as whl:
        registry = whl.read("vllm/model_executor/models/registry.py").decode()
    for architecture in architectures:
        assert re.search(rf'"{architecture}":\s*\(', registry), f"{architecture} not in vLLM {vllm}"
    # The daemon's environment does not need vLLM, nor the VLM server's PaddleX.
    assert "vllm" not in resolved[DAEMON_ENV].dists()
    assert "paddlex" not in resolved[VLLM_ENV].dists()


def test_torch_is_a_cuda_build_and_every_cuda_wheel_agrees(resolved: dict[str, Resolved]) -> None:
    env = resolved[VLLM_ENV]
    torch_url = env.url("torch")
    assert "+" not in torch_url.rsplit("/", 1)[-1], f"torch with a local tag: {torch_url}"
    runtime = [r for r in env.requires("torch") if re.fullmatch(r"nvidia-cuda-runtime-cu\d+", r.name)
               and (r.marker is None or r.marker.evaluate({"platform_system": "Linux",
                                                            "platform_machine": "x86_64"}))]
    assert len(runtime) == 1, "torch declares no CUDA runtime wheel: not a CUDA build"
    major = runtime[0].name.rsplit("cu", 1)[1]
    assert env.version(runtime[0].name) in runtime[0].specifier
    cuda = {name: m.group(1) for name in env.dists()
            if (m := re.search(r"[-_]cu(?:da)?(\d+)x?$", name))}
    assert cuda and set(cuda.values()) == {major}, cuda
    # torchvision and torchaudio from the same CUDA build as torch.
    for name in ("torchvision", "torchaudio"):
        if name in env.dists():
            assert "+" not in env.url(name).rsplit("/", 1)[-1]


def test_each_environment_has_one_opencv(resolved: dict[str, Resolved]) -> None:
    for venv, env in resolved.items():
        found = OPENCV & set(env.dists())
        assert len(found) == 1, f"{venv}: {sorted(found)} all write cv2/"


def test_the_daemon_environment_runs_the_pinned_paddleocr_for_the_served_model(
    resolved: dict[str, Resolved], args: dict[str, str],
    paddlex_vllm_facts: tuple[dict[str, Any], set[str]],
) -> None:
    env = resolved[DAEMON_ENV]
    assert env.version("paddleocr") == Version(args["PADDLEOCR_VERSION"])
    assert env.version("paddlepaddle") == Version(args["PADDLE_VERSION"])
    assert "watcher" in env.dists()
    # The `gpu` extra users install outside the image admits the image's pins.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = {"paddleocr": args["PADDLEOCR_VERSION"], "paddlepaddle-gpu": args["PADDLE_VERSION"]}
    for text in pyproject["project"]["optional-dependencies"]["gpu"]:
        req = Requirement(text)
        assert req.specifier.contains(pins[req.name]), (req, pins[req.name])
    # The weights the image bakes are those of the release it defaults to, whose served
    # name PaddleX's client knows.
    served, source = PADDLEOCR_VL_MODELS[args["PIPELINE_VERSION"]]
    assert args["VLM_MODEL_SOURCE"] == source
    info, _ = paddlex_vllm_facts
    assert served in info

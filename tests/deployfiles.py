"""The Dockerfile read as data: instructions, ARG defaults, ENV values, pip installs, COPYs.

Shared by the tests that check what the image is built from (tests/test_deploy.py) and
what its environments resolve to (tests/test_image_resolution.py), so that they read the
pins where the image takes them from instead of repeating them.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    word: str
    rest: str


@dataclass
class PipInstall:
    """One `<venv>/bin/pip install ...` of a RUN, variables expanded."""

    venv: str
    options: dict[str, str] = field(default_factory=dict)
    requirements: list[str] = field(default_factory=list)


def instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions in order, continuation lines joined and comments dropped."""
    result: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        result.append(Instruction(word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return result


def arg_defaults(instrs: list[Instruction]) -> dict[str, str]:
    defaults = {}
    for ins in instrs:
        if ins.word == "ARG":
            name, _, value = ins.rest.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def expand(text: str, variables: dict[str, str]) -> str:
    """${NAME} and $NAME from the given variables; unknown ones stay as they are."""
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, match.group(0))
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)


def env_values(instrs: list[Instruction], args: dict[str, str]) -> dict[str, str]:
    """The image's ENV after the last instruction, for the given build arguments."""
    env: dict[str, str] = {}
    for ins in instrs:
        if ins.word == "ENV":
            for pair in shlex.split(ins.rest):
                name, _, value = pair.partition("=")
                env[name] = expand(value, {**args, **env})
    return env


def run_commands(instrs: list[Instruction], args: dict[str, str]) -> list[list[str]]:
    """Each `&&`-joined command of every RUN, split as the shell would, variables expanded."""
    commands = []
    for ins in instrs:
        if ins.word != "RUN":
            continue
        for part in re.split(r"\s&&\s", ins.rest):
            try:
                argv = shlex.split(part)
            except ValueError:
                continue  # part of a larger shell construct, never a pip install
            commands.append([expand(a, args) for a in argv])
    return commands


# The pip options the image's installs use; any other one makes the tests say so.
_VALUED = {"-i": "index-url", "--index-url": "index-url", "--uploaded-prior-to": "uploaded-prior-to",
           "--only-binary": "only-binary", "--extra-index-url": "extra-index-url"}


def pip_installs(instrs: list[Instruction], args: dict[str, str]) -> list[PipInstall]:
    installs = []
    for argv in run_commands(instrs, args):
        if len(argv) < 2 or not argv[0].endswith("/bin/pip") or argv[1] != "install":
            continue
        install = PipInstall(venv=str(PurePosixPath(argv[0]).parent.parent))
        words = iter(argv[2:])
        for word in words:
            name, eq, value = word.partition("=")
            if word.startswith("-"):
                key = _VALUED.get(name)
                assert key is not None, f"pip option {word!r} in the Dockerfile is not understood here"
                install.options[key] = value if eq else next(words)
            else:
                install.requirements.append(word)
        installs.append(install)
    return installs


def copy_context(instrs: list[Instruction], target: Path) -> Path:
    """Lays out what the COPY instructions put in the image, under `target`; returns it."""
    workdir = PurePosixPath("/")
    for ins in instrs:
        if ins.word == "WORKDIR":
            workdir = workdir / ins.rest
        elif ins.word == "COPY":
            parts = [p for p in shlex.split(ins.rest) if not p.startswith("--")]
            *sources, dest = parts
            destination = workdir / dest
            for source in sources:
                origin = REPO / source
                into = target / destination.relative_to("/")
                if dest.endswith("/") or len(sources) > 1:
                    into = into / origin.name
                into.parent.mkdir(parents=True, exist_ok=True)
                if origin.is_dir():
                    shutil.copytree(origin, into, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(origin, into)
    return target

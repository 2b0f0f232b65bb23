"""Fetch: stream one exact source version (If-Match on its ETag) into a temp file.

Each attempt of the download starts the file and its SHA-256 over, and the byte limit is
enforced while streaming, so what reaches the decoder is one whole response of exactly
that version, whatever the network did; its size is the bytes received, never a listing's
or a notification's figure.

Downloads go to a directory of this daemon process's own (`work_dir`), named after its
pid and a random incarnation id. A daemon killed with SIGKILL leaves its directory behind;
the next daemon on the host removes every directory whose process is gone (core/identity.py), so temp space
does not leak across crashes, and never touches a live neighbour's downloads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from watcher.bucket.storage import ObjectTooLarge, Storage
from watcher.core.errors import DocumentError, ErrorCode
from watcher.core.identity import INCARNATION, left_by_dead_process
from watcher.core.refs import ObjectRef

WORK_ROOT = "watcher-work"


def prepare_work_dir(temp_dir: str | None) -> Path:
    """A new download directory for this daemon, after removing those of dead processes."""
    root = Path(temp_dir or tempfile.gettempdir()) / WORK_ROOT
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        pid_text, _, rest = entry.name.partition("-")
        incarnation = rest.partition("-")[0]
        if not pid_text.isdigit() or left_by_dead_process(int(pid_text), incarnation):
            shutil.rmtree(entry, ignore_errors=True)
    work = root / f"{os.getpid()}-{INCARNATION}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    return work


class _FileSink:
    """The temp file and the SHA-256 of one download; both start over with each attempt."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.digest = hashlib.sha256()

    def restart(self) -> None:
        self.fh.seek(0)
        self.fh.truncate()
        self.digest = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.fh.write(chunk)
        self.digest.update(chunk)


@dataclass(frozen=True)
class Fetched:
    path: Path  # the caller deletes it
    size: int  # bytes received: what `empty` and `too_large` are decided from
    sha256: str


async def fetch(storage: Storage, ref: ObjectRef, temp_dir: Path | str | None, max_bytes: int) -> Fetched:
    """Download exactly the version `ref` names to a new temp file, hashing on the way."""
    # Keep the extension: some engines pick their decoder by file name.
    suffix = Path(ref.key).suffix[:16]
    fd, name = tempfile.mkstemp(prefix="watcher-", suffix=suffix, dir=temp_dir)
    path = Path(name)
    try:
        with os.fdopen(fd, "w+b") as fh:
            sink = _FileSink(fh)
            try:
                got = await storage.download(ref, sink, max_bytes)
            except ObjectTooLarge as exc:
                size = f"{exc.size} bytes" if exc.exact else f"more than {exc.limit} bytes"
                raise DocumentError(
                    ErrorCode.TOO_LARGE,
                    f"the object is {size}, over the limit of {exc.limit} (WATCHER_MAX_OBJECT_BYTES)",
                ) from None
    except BaseException:
        os.unlink(path)
        raise
    return Fetched(path, got.size, sink.digest.hexdigest())

"""Fetch: stream one exact source version (If-Match on its ETag) into a temp file.

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
from pathlib import Path

from watcher.bucket.storage import ObjectRef, Storage
from watcher.core.errors import DocumentError, ErrorCode
from watcher.core.identity import INCARNATION, left_by_dead_process

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


async def fetch(
    storage: Storage, ref: ObjectRef, temp_dir: Path | str | None, max_bytes: int
) -> tuple[Path, str]:
    """Download `ref` to a new temp file; its path (the caller deletes it) and the
    content's SHA-256, computed on the way."""
    if ref.size > max_bytes:
        raise DocumentError(
            ErrorCode.TOO_LARGE,
            f"the object is {ref.size} bytes, over the limit of {max_bytes} "
            "(WATCHER_MAX_OBJECT_BYTES)",
        )
    # Keep the extension: some engines pick their decoder by file name.
    suffix = Path(ref.key).suffix[:16]
    fd, name = tempfile.mkstemp(prefix="watcher-", suffix=suffix, dir=temp_dir)
    path = Path(name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as fh:

            def sink(chunk: bytes) -> None:
                fh.write(chunk)
                digest.update(chunk)

            written = await storage.download(ref, sink)
        if written > max_bytes:
            raise DocumentError(ErrorCode.TOO_LARGE, "the object grew past WATCHER_MAX_OBJECT_BYTES")
    except BaseException:
        os.unlink(path)
        raise
    return path, digest.hexdigest()

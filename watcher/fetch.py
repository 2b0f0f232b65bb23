"""Fetch: stream one exact source version (If-Match on its ETag) into a temp file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from watcher.errors import DocumentError, ErrorCode
from watcher.storage import ObjectRef, Storage


async def fetch(storage: Storage, ref: ObjectRef, temp_dir: str | None, max_bytes: int) -> Path:
    """Download `ref` to a new temp file and return its path; the caller deletes it."""
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
        with os.fdopen(fd, "wb") as fh:
            written = await storage.download(ref, fh.write)
        if written > max_bytes:
            raise DocumentError(ErrorCode.TOO_LARGE, "the object grew past WATCHER_MAX_OBJECT_BYTES")
    except BaseException:
        os.unlink(path)
        raise
    return path

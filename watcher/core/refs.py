"""The unit of work every part passes along: one version of one source object."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """One version of one source object, as a listing or a notification named it.

    `key` and `etag` are its identity. `size` and `last_modified` are what the listing or
    notification said: hints for ordering and display, never evidence; what a document is
    (empty, too large) is decided from the bytes fetched.
    """

    bucket: str
    key: str
    etag: str
    size: int
    last_modified: datetime | None = None
    # SHA-256 of the content, once fetched (pipeline/fetch.py); not part of the identity.
    sha256: str | None = field(default=None, compare=False)


def clean_etag(etag: str) -> str:
    """An ETag without the quotes S3 puts around it."""
    return etag.strip().strip('"')

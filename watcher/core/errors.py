"""Why a document failed: permanent errors carry a stable code and an operator's message.

Permanent errors end in an `.error.json` record and are never retried for the same
source version. Anything else (S3 unavailable, engine unreachable) is transient: the
document is released and discovery offers it again.
"""

from __future__ import annotations

import re
from enum import StrEnum

# Absolute file paths (`/tmp/watcher-work/123/doc.pdf`): they say nothing to a document's
# owner and tell an outsider about the server.
_LOCAL_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s/'\"]+/)+[^\s'\",;:)\]]*")


def scrub(message: str) -> str:
    """`message` without local paths, for anything a consumer or a log reader sees."""
    return _LOCAL_PATH.sub("<file>", message)


class ErrorCode(StrEnum):
    EMPTY = "empty"
    CORRUPT = "corrupt"
    ENCRYPTED = "encrypted"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TOO_LARGE = "too_large"
    TOO_MANY_PAGES = "too_many_pages"
    PAGE_TOO_LARGE = "page_too_large"
    BAD_PAGE_GEOMETRY = "bad_page_geometry"
    ENGINE_FAILED = "engine_failed"
    KEY_REFUSED = "key_refused"
    NAME_COLLISION = "name_collision"
    INTERNAL = "internal_error"


class DocumentError(Exception):
    """A permanent problem with one document version."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        message = scrub(message)
        super().__init__(message)
        self.code = code
        self.message = message


class EngineUnavailable(Exception):
    """The engine cannot serve right now (VLM server down); the document waits."""


class EngineCrashed(Exception):
    """The engine failed on this page: its worker hung, died or raised.

    `reason` is `timeout`, `crash` (the worker process died) or `error` (the engine
    raised); each such failure uses one of the document's WATCHER_MAX_ATTEMPTS.
    """

    def __init__(self, reason: str, detail: str, connection_error: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        # The engine's own HTTP client failed (PaddleOCR-VL to vLLM): maybe not a crash.
        self.connection_error = connection_error
        # The document's page it failed on, once the pipeline knows (blamed in the lease).
        self.page: int | None = None

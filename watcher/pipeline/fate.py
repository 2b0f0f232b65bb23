"""The one place that decides what a failure means.

Every exception that ends a document's run goes through `classify`, which says whether
it is permanent (the document itself is bad: an error record now), transient (S3 or the
engine's server is away: release, retry later, no attempt used), a crash (the engine
hung, died or raised on it, or an unforeseen bug: one attempt used, an error record
after WATCHER_MAX_ATTEMPTS), that the store refuses a name the document needs (an error
record if one can be written, else a logged, counted skip), or that the source changed
under us (nothing to do).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from watcher.bucket.leases import LeaseLost
from watcher.bucket.storage import KeyRefused, PreconditionFailed, StorageUnavailable
from watcher.core.errors import DocumentError, EngineCrashed, EngineUnavailable, ErrorCode
from watcher.pipeline.publish import Superseded


class Fate(StrEnum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    CRASH = "crash"
    GONE = "gone"
    REFUSED = "refused"


@dataclass(frozen=True)
class Failure:
    fate: Fate
    code: ErrorCode | None
    message: str
    page: int | None = None  # a crash on one page of the document: that page is blamed


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, DocumentError):
        return Failure(Fate.PERMANENT, exc.code, exc.message)
    if isinstance(exc, StorageUnavailable | EngineUnavailable | LeaseLost):
        return Failure(Fate.TRANSIENT, None, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, KeyRefused):
        return Failure(Fate.REFUSED, ErrorCode.KEY_REFUSED, str(exc))
    if isinstance(exc, PreconditionFailed | FileNotFoundError | Superseded):
        return Failure(Fate.GONE, None, "the source changed or was deleted while it was processed")
    if isinstance(exc, EngineCrashed):
        on = "" if exc.page is None else f" (page {exc.page + 1})"
        message = f"engine {exc.reason}: {exc.detail}{on}"
        return Failure(Fate.CRASH, ErrorCode.ENGINE_FAILED, message, exc.page)
    # A bug, or an input that a library chokes on in an unforeseen way: retried like a
    # crash, then recorded, so one document never stalls the others.
    return Failure(Fate.CRASH, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

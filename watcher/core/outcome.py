"""How one run of one document ended: the words every part of the daemon counts by."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from watcher.core.refs import ObjectRef


class Outcome(StrEnum):
    """How one run of one document ended (the `outcome` label of watcher_documents)."""

    DONE = "done"
    ERROR = "error"
    SKIPPED = "skipped"
    HELD = "held"  # another live replica holds its lease; looked at again when that expires
    RETRY = "retry"
    REFUSED = "refused"  # the store refuses its keys and no error record could be written


# The version has a result or an error record, or is not ours to do: nothing to look at
# again (a notification for it can go; a manifest need not offer it again).
FINISHED = frozenset({Outcome.DONE, Outcome.ERROR, Outcome.SKIPPED, Outcome.REFUSED})


@dataclass(frozen=True)
class Report:
    """What one run of one document came to: what every outcome hook is told."""

    ref: ObjectRef
    outcome: Outcome
    seconds: float = 0.0
    # The object the run wrote or found: the result JSON, or the error record.
    output: str | None = None
    code: str | None = None  # the error record's code
    message: str | None = None  # why: the error, or what was skipped or deferred
    pages: int | None = None
    # HELD: when the holder's lease runs out (epoch seconds), to look again then.
    retry_at: float | None = None


class OutcomeHook(Protocol):
    """Told of every finished run, in the order runs end; must not block (what takes
    time, such as a callback or an SQS delete, is queued by the hook itself)."""

    def ended(self, report: Report) -> None: ...

"""How one run of one document ended: the words every part of the daemon counts by."""

from __future__ import annotations

from enum import StrEnum


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

"""What a person at a terminal reads: one line per document as it finishes, and what
happened in all when the daemon stops (Ctrl-C, SIGTERM) or `--once` ends.

The lines are printed in the `human` log format (WATCHER_LOG_FORMAT; `auto` on a
terminal, and always in `watcher demo`); JSON logs stay as they are for machines.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from watcher.core.outcome import Outcome, Report

# Longest part of an error's message on a document's line; the error record has all of it.
MESSAGE_SHOWN = 110


def _say(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


def document_line(report: Report) -> str | None:
    """`done   input/x.pdf → output/x.pdf.json  3 pages  5.7 s`, or None for runs that
    come back by themselves (held by another replica)."""
    r, key = report, report.ref.key
    if r.outcome is Outcome.DONE:
        pages = f"  {r.pages} page{'' if r.pages == 1 else 's'}" if r.pages is not None else ""
        return f"done   {key} → {r.output}{pages}  {r.seconds:.1f} s"
    if r.outcome is Outcome.ERROR:
        return f"error  {key} → {r.output}  {r.code}: {_short(r.message)}"
    if r.outcome is Outcome.SKIPPED:
        return f"skip   {key}  {_short(r.message)}"
    if r.outcome is Outcome.RETRY:
        return f"later  {key}  {_short(r.message)} (tried again later)"
    if r.outcome is Outcome.REFUSED:
        return f"refused {key}  {_short(r.message)}"
    return None


def _short(message: str | None) -> str:
    text = " ".join((message or "").split())
    return text if len(text) <= MESSAGE_SHOWN else text[: MESSAGE_SHOWN - 1] + "…"


class DocumentLines:
    """An outcome hook: one line per finished run."""

    def __init__(self, say: Callable[[str], None] = _say) -> None:
        self.say = say

    def ended(self, report: Report) -> None:
        line = document_line(report)
        if line is not None:
            self.say(line)


def counted(counts: Counter[Outcome]) -> str:
    """`9 done, 1 error record, 2 skipped`: the runs that settled a document, in a fixed
    order (runs that end in a retry are not counted: the document comes back)."""
    words = {Outcome.DONE: ("done", "done"), Outcome.ERROR: ("error record", "error records"),
             Outcome.SKIPPED: ("skipped", "skipped")}
    parts = [f"{counts[o]} {one if counts[o] == 1 else many}"
             for o, (one, many) in words.items() if counts[o] or o in (Outcome.DONE, Outcome.ERROR)]
    return ", ".join(parts)


@dataclass(frozen=True)
class Stopped:
    """What the daemon did between start and stop, for the stop summary."""

    counts: Counter[Outcome]
    released: int  # documents cut off by the drain, their leases freed
    results: str  # where the results are: s3://bucket/prefix


def stop_summary(stopped: Stopped) -> list[str]:
    lines = [f"stopped: {counted(stopped.counts)} since start; results in {stopped.results}"]
    if stopped.released:
        lines.append(f"  {stopped.released} document(s) in flight were released unfinished: "
                     "the next start (or another replica) reads them again")
    else:
        lines.append("  nothing was in flight: every document taken was finished")
    return lines


@dataclass(frozen=True)
class OnceRun:
    """What `--once` came to."""

    counts: Counter[Outcome]
    failures: list[Report]  # this run's error records
    unfinished: list[Report]  # retried, held or refused to the end
    earlier_errors: list[tuple[str, str]]  # (source, error record) from earlier runs
    reason: str | None  # why it stopped short, if it did


def once_summary(run: OnceRun) -> list[str]:
    unfinished = f", {len(run.unfinished)} not finished" if run.unfinished else ""
    lines = [f"--once: {counted(run.counts)}{unfinished}"]
    lines += [f"error  {r.ref.key} → {r.output}  {r.code}" for r in run.failures]
    lines += [f"not finished  {r.ref.key} ({r.outcome.value}: {_short(r.message)})" for r in run.unfinished]
    if run.earlier_errors:
        lines.append(f"{len(run.earlier_errors)} source(s) already had an error record and were not read "
                     "again (upload a new version, or delete the source):")
        lines += [f"  {source} → {record}" for source, record in run.earlier_errors[:50]]
        if len(run.earlier_errors) > 50:
            lines.append(f"  … and {len(run.earlier_errors) - 50} more")
    if run.reason:
        lines.append(run.reason)
    return lines

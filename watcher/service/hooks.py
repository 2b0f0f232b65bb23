"""Outcome hooks of the daemon's own: metrics, what `--once` reports, and held documents
looked at again when their holder's lease runs out. (The SQS source, the fleet's
follower and the callbacks subscribe with `ended(report)` methods of their own.)"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from watcher.core.metrics import Metrics
from watcher.core.outcome import FINISHED, Outcome, Report
from watcher.core.progress import Bins
from watcher.core.refs import ObjectRef

# Sources whose last run is remembered for `--once`'s report (it sees each source once
# per round; a long-running daemon keeps only the most recent).
OUTCOMES_REMEMBERED = 100_000


class MetricsHook:
    def __init__(self, metrics: Metrics, refresh: Callable[[], None]) -> None:
        self.metrics = metrics
        self.refresh = refresh

    def ended(self, report: Report) -> None:
        self.metrics.documents.labels(report.outcome.value).inc()
        self.metrics.stage_seconds.labels("document").observe(report.seconds)
        self.refresh()


class LastOutcomes:
    """How each source's last run ended, newest last, bounded; and how many runs ended
    each way."""

    def __init__(self, limit: int = OUTCOMES_REMEMBERED) -> None:
        self.limit = limit
        self.reports: OrderedDict[str, Report] = OrderedDict()
        self.counts: Counter[Outcome] = Counter()  # every run since start, by outcome

    def ended(self, report: Report) -> None:
        self.counts[report.outcome] += 1
        self.reports[report.ref.key] = report
        self.reports.move_to_end(report.ref.key)
        while len(self.reports) > self.limit:
            self.reports.popitem(last=False)

    def unfinished(self) -> list[Report]:
        """Sources whose last run did not end with a result."""
        return self.ended_with(Outcome.ERROR, Outcome.RETRY, Outcome.REFUSED, Outcome.HELD)

    def ended_with(self, *outcomes: Outcome) -> list[Report]:
        return sorted((r for r in self.reports.values() if r.outcome in outcomes), key=lambda r: r.ref.key)


@dataclass(frozen=True)
class Finished:
    """A finished run as the status page lists it."""

    at: float  # epoch seconds
    report: Report


class RecentWork:
    """The last runs that finished (result, error record, skipped), newest first, and how
    many finished per bin of the status page's chart. Held and retried runs are left
    out: they come back."""

    def __init__(self, limit: int = 25, clock: Callable[[], float] = time.time) -> None:
        self.last: deque[Finished] = deque(maxlen=limit)
        self.clock = clock
        self.finished = Bins(clock)

    def ended(self, report: Report) -> None:
        if report.outcome not in FINISHED:
            return
        self.last.appendleft(Finished(self.clock(), report))
        self.finished.add()


class HeldRetry:
    """A document whose lease another holder has is offered again once that lease ran out."""

    def __init__(self, retry_at: Callable[[ObjectRef, float], None]) -> None:
        self.retry_at = retry_at

    def ended(self, report: Report) -> None:
        if report.outcome is Outcome.HELD and report.retry_at is not None:
            self.retry_at(report.ref, report.retry_at)

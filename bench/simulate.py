"""The long run of the protocol simulation (tests/simulation.py): many seeds, one summary.

Each seed draws a fleet (1 to 3 replicas), a source action, fault rates, pod deaths and a
stream of uploads, overwrites and deletes, runs the real claim/fetch/publish/settle code
on virtual time against the in-memory S3, and checks the invariants. A seed that breaks
one prints its violations and trace tail; replay it with --seed N --trace.

    python bench/simulate.py --seeds 10000
    python bench/simulate.py --seed 1234 --trace
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from simulation import Simulation, describe, run_seed


class Tally:
    """Counts over every seed run, so that a long run keeps no simulation in memory."""

    def __init__(self) -> None:
        self.seeds = 0
        self.failed: list[int] = []
        self.races = self.racing = self.runs = self.deaths = 0
        self.virtual = 0.0
        self.requests: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()

    def add(self, sim: Simulation) -> None:
        self.seeds += 1
        if sim.violations:
            self.failed.append(sim.config.seed)
        self.races += len(sim.fallback_races)
        self.racing += bool(sim.config.faults.ignored_conditions)
        self.requests.update(r.op for r in sim.s3.requests if r.actor != "producer")
        self.faults.update(r.note for r in sim.s3.requests
                           if r.note in ("500", "503 SlowDown", "response lost", "cut"))
        self.runs += sum(sim.runs.values())
        self.deaths += sim.config.deaths
        self.virtual += sim.clock.now
        self.actions[sim.config.action.value] += 1

    def summary(self, seconds: float) -> str:
        first = f"  (first: {self.failed[0]})" if self.failed else ""
        return "\n".join([
            f"seeds run                 {self.seeds}",
            f"seeds failing             {len(self.failed)}{first}",
            f"wall seconds              {seconds:.1f}  ({1000 * seconds / max(1, self.seeds):.1f} ms a seed)",
            f"virtual seconds           {self.virtual:.0f}"
            f"  ({self.virtual / max(seconds, 1e-9):.0f}x real time)",
            f"source actions            {dict(self.actions)}",
            f"engine runs               {self.runs}",
            f"pod deaths                {self.deaths}",
            f"S3 requests by replicas   {sum(self.requests.values())}  {dict(self.requests.most_common())}",
            f"faults injected           {dict(self.faults)}",
            f"fallback races            {self.races} in {self.racing} seeds whose store ignores "
            "conditional DELETE or copy (a new upload lost between the HEAD and the DELETE; "
            "not violations)",
        ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10_000, help="how many seeds (from --first)")
    parser.add_argument("--first", type=int, default=0, help="the first seed")
    parser.add_argument("--seed", type=int, default=None, help="run this one seed only")
    parser.add_argument("--trace", action="store_true", help="print the whole trace of each seed run")
    args = parser.parse_args()
    seeds = [args.seed] if args.seed is not None else range(args.first, args.first + args.seeds)
    started = time.perf_counter()
    tally = Tally()
    for seed in seeds:
        sim = run_seed(seed)
        tally.add(sim)
        if args.trace:
            print(describe(sim, tail=len(sim.trace)))
        elif sim.violations:
            print(describe(sim), file=sys.stderr)
    print(tally.summary(time.perf_counter() - started))
    return 1 if tally.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

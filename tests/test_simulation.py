"""The protocol's invariants over a few hundred seeded interleavings (tests/simulation.py):
replicas of the real code, producers, faults, dropped and reordered notifications, pods
killed at any step. `python bench/simulate.py --seeds 10000` runs the long version."""

from __future__ import annotations

from typing import Any

import pytest
from simulation import SimConfig, describe, run_seed

from watcher.bucket.names import Names
from watcher.bucket.storage import Storage
from watcher.core.refs import ObjectRef
from watcher.core.settings import SourceAction
from watcher.pipeline import document as document_module
from watcher.pipeline.settle import Settled

SEEDS = 250  # about half a minute on one core: the end-to-end tier
FEW_SEEDS = 20  # the fast tier's sample


def assert_invariants_hold(seeds: range) -> None:
    failed: list[str] = []
    for seed in seeds:
        sim = run_seed(seed)
        if sim.violations:
            failed.append(describe(sim, tail=60))
    assert not failed, f"{len(failed)} seeds failed; the first:\n" + "\n\n".join(failed[:2])


@pytest.mark.e2e
def test_the_invariants_hold_over_many_seeds() -> None:
    assert_invariants_hold(range(SEEDS))


def test_the_invariants_hold_over_a_few_seeds() -> None:
    # Seeds from the far end of the long run's range, so the two tiers see different ones.
    assert_invariants_hold(range(10_000 - FEW_SEEDS, 10_000))


def test_a_seed_replays_exactly() -> None:
    first, second = run_seed(11), run_seed(11)
    assert first.trace == second.trace and len(first.trace) > 50


def failing_seeds(count: int, **config: Any) -> list[int]:
    return [seed for seed in range(count)
            if run_seed(seed, SimConfig(seed=seed, **config)).violations]


@pytest.mark.e2e  # thirty seeds twice: the long tier
def test_the_simulation_catches_a_settle_that_ignores_the_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run that cannot fail proves nothing: with a settle that moves whatever version is
    there (the bug this protocol fixed), a version uploaded while the last one was read is
    moved away unread, and the simulation says so."""
    config = {"action": SourceAction.MOVE, "actions": 24, "keys": 2, "engine_seconds": 4.0}
    assert failing_seeds(15, **config) == []

    async def careless(storage: Storage, names: Names, ref: ObjectRef, action: SourceAction) -> Settled:
        await storage.copy(ref.key, names.done(ref.key))
        await storage.delete(ref.key)
        return Settled.MOVED

    monkeypatch.setattr(document_module, "settle", careless)
    assert failing_seeds(15, **config)

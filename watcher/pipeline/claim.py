"""Claim: skip versions already done, and take the lease on the rest.

Before taking a lease a replica looks for the version's done-marker (one HEAD): most
versions a stale listing or a repeated notification offers stop there. Once the lease is
held it looks again, marker and result, so that a version another replica published a
moment before is never read or published twice, and a result whose publisher was cut off
before its marker is recognised (bucket/done.py marks it).
"""

from __future__ import annotations

from dataclasses import dataclass

from watcher.bucket.done import Done, DoneMarkers
from watcher.bucket.leases import Held, Lease, Leases
from watcher.core.refs import ObjectRef


@dataclass(frozen=True)
class Claim:
    """How claiming a version came out: exactly one field is set, or none when a race
    with another replica was lost (the winner has it)."""

    lease: Lease | None = None  # ours to process
    done: Done | None = None  # finished already, and how we know
    held: Held | None = None  # another holder has it until `held.expires_at`


class Claimer:
    def __init__(self, leases: Leases, done: DoneMarkers) -> None:
        self.leases = leases
        self.done = done

    async def claim(self, ref: ObjectRef) -> Claim:
        marked = await self.done.marked(ref)
        if marked is not None:
            return Claim(done=marked)
        got = await self.leases.acquire(ref)
        if got is None:
            return Claim()
        if isinstance(got, Held):
            return Claim(held=got)
        try:
            done = await self.done.published(ref)
        except BaseException:
            await got.release()
            raise
        if done is not None:
            await got.finish()
            return Claim(done=done)
        return Claim(lease=got)

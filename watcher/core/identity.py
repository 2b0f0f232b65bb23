"""Who this daemon process is, so that what it leaves behind can be told from a neighbour's.

Leases (bucket/leases.py) and download directories (pipeline/fetch.py) record the host,
the pid and a random incarnation id. A record from this host whose process is gone, or
that names our own pid under another incarnation (a restarted container is pid 1 again),
was left by a daemon that died; one from a live process, or from this very process, is
not. `Identity` carries these with the replica id and the wall clock, so that a
simulation can run several replicas, restarts and skewed clocks in one process.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

INCARNATION = uuid.uuid4().hex
HOST = socket.gethostname()


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def left_by_dead_process(pid: int, incarnation: str) -> bool:
    """A record of this host's: was the process that wrote it gone?"""
    return Identity("").left_by_dead_process(pid, incarnation)


@dataclass(frozen=True)
class Identity:
    """One replica's running process: its id, host, pid, incarnation and clock."""

    replica: str
    host: str = HOST
    pid: int = field(default_factory=os.getpid)
    incarnation: str = INCARNATION
    clock: Callable[[], float] = time.time
    alive: Callable[[int], bool] = pid_alive

    def left_by_dead_process(self, pid: int, incarnation: str) -> bool:
        """A record of this host's: was the process that wrote it gone?"""
        if incarnation == self.incarnation:
            return False
        return pid == self.pid or not self.alive(pid)

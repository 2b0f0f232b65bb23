"""Who this daemon process is, so that what it leaves behind can be told from a neighbour's.

Leases (bucket/leases.py) and download directories (pipeline/fetch.py) record the host, the pid and a
random incarnation id. A record from this host whose process is gone, or that names our
own pid under another incarnation (a restarted container is pid 1 again), was left by a
daemon that died; one from a live process, or from this very process, is not.
"""

from __future__ import annotations

import os
import socket
import uuid

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
    if incarnation == INCARNATION:
        return False
    return pid == os.getpid() or not pid_alive(pid)

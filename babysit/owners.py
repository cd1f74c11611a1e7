"""Which process owns a RUNNING MLflow run: its tag `babysit.owner`, 'host:pid:start time'.

A run whose process is gone was left RUNNING by a kill, or by a tracking server that stopped
answering before the run could be ended; the next command on the same store ends it FAILED.
"""

from __future__ import annotations

import os
import socket

import psutil

TAG = "babysit.owner"


def process_identity(pid: int | None = None) -> str:
    """'host:pid:start time' of a process (this one by default): a pid alone may since name another process."""
    return f"{socket.gethostname()}:{pid or os.getpid()}:{psutil.Process(pid or os.getpid()).create_time():.0f}"


def alive_here(identity: str) -> bool:
    """Whether `identity` (process_identity) is a process running now on this machine, other than this one."""
    try:
        host, pid, _ = identity.rsplit(":", 2)
        return host == socket.gethostname() and int(pid) != os.getpid() and process_identity(int(pid)) == identity
    except (ValueError, psutil.Error):  # no tag (a run from before the tag existed), or the process is gone
        return False


def gone_here(identity: str) -> bool:
    """Whether `identity` (process_identity) names a process of this machine that has ended (killed)."""
    try:
        host, pid, _ = identity.rsplit(":", 2)
        mine = host == socket.gethostname() and int(pid) != os.getpid()
    except ValueError:  # no tag: a run from before the tag existed, nothing is known
        return False
    return mine and not alive_here(identity)

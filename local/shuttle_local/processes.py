"""Whether a process runs, by its pid: for a client's pidfile and for a one-shot firewalld's
socket files, whose names are pids."""

from __future__ import annotations

import os


def running(pid: int) -> bool:
    """Whether a process with this pid exists (another user's counts); False for a number
    no pid can be."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True

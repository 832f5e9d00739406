"""A lock between processes: the parallel workers of one test run (pytest -n) and runs that
share the machine take it around what they must not do at the same time."""

from __future__ import annotations

import contextlib
import fcntl
import time
from pathlib import Path
from typing import Iterator

POLL = 0.1


@contextlib.contextmanager
def locked(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive flock on path (created if missing) for the block.

    Waits at most timeout seconds for another holder, then raises TimeoutError. The kernel
    drops the lock when its holder dies, so a killed worker never leaves it taken.
    """
    with path.open("a") as file:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / POLL) + 2):
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{path} still locked after {timeout:g} s") from None
                time.sleep(POLL)
        else:
            raise TimeoutError(f"{path} still locked after {timeout:g} s")
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)

"""A tunnel's processes, seen through /proc: the tree under its main process, which of them
still run, and their memory.

A process is named by its pid and its start time, so that a pid the kernel reuses is not
taken for the process that had it. sshuttle's firewall helper leaves the main process's
session (setsid) and outlives it while it removes the rules, so "all its processes" is the
tree taken before the stop, not the process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

Process = tuple[int, int]  # pid, start time in clock ticks since boot


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def tree(root: int) -> set[Process]:
    """root and every process below it, as they are now."""
    children: dict[int, list[Process]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append((int(entry.name), int(fields[19])))
    found: set[Process] = set()
    fields = _stat(root)
    todo = [(root, int(fields[19]))] if fields is not None else []
    while todo and len(found) < 10_000:  # a bound: a tunnel has a handful
        process = todo.pop()
        found.add(process)
        todo.extend(children.get(process[0], []))
    return found


def running(processes: set[Process]) -> list[int]:
    """The pids of those processes that still run (a zombie has ended)."""
    alive = []
    for pid, start in processes:
        fields = _stat(pid)
        if fields is not None and int(fields[19]) == start and fields[0] != "Z":
            alive.append(pid)
    return alive


def kill(processes: set[Process]) -> None:
    for pid in running(processes):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def rss_mib(pid: int) -> float:
    """The resident memory of one process (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0  # a zombie has no VmRSS line


def tree_rss_mib(root: int) -> float:
    """The resident memory of root and every process below it, summed, in MiB."""
    total = 0.0
    for pid, _start in tree(root):
        with contextlib.suppress(OSError):
            total += rss_mib(pid)
    return total

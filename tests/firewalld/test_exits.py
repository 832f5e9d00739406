"""Exits: pidfds of real processes, each reported once its process has exited, and refused
for a process that is gone or is another uid's."""

from __future__ import annotations

import os
import select
import signal
import subprocess
from collections.abc import Iterator

import pytest
from shuttle_firewalld.exits import Exits, ProcessGone

from .daemon import NOBODY, WAIT, wait_until

SLEEPER = ["sleep", "60"]


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; each killed and reaped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(WAIT)


def start(procs: list[subprocess.Popen[bytes]], argv: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv)
    procs.append(proc)
    return proc


def readable(exits: Exits) -> bool:
    """Whether the loop's poller would wake for exits now."""
    poller = select.poll()
    poller.register(exits.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def test_an_exit_is_reported_until_forgotten(sleepers: list[subprocess.Popen[bytes]]) -> None:
    exits = Exits()
    first, second = start(sleepers, SLEEPER), start(sleepers, SLEEPER)
    exits.watch("a", first.pid, os.getuid())
    exits.watch("b", second.pid, os.getuid())
    assert (exits.exited(), readable(exits), len(exits)) == ([], False, 2)
    first.send_signal(signal.SIGKILL)
    first.wait(WAIT)  # reaped: its pid may be anyone's now, the pidfd still names it
    assert wait_until(lambda: exits.exited() == ["a"])
    assert readable(exits)
    exits.forget("a")
    exits.forget("a")  # twice is nothing
    assert (exits.exited(), readable(exits), len(exits)) == ([], False, 1)
    second.send_signal(signal.SIGKILL)  # not reaped: a zombie has exited all the same
    assert wait_until(lambda: exits.exited() == ["b"])
    exits.forget("b")
    assert len(exits) == 0


def test_a_process_that_is_gone_is_refused(sleepers: list[subprocess.Popen[bytes]]) -> None:
    exits = Exits()
    zombie = start(sleepers, ["true"])
    assert wait_until(lambda: _state(zombie.pid) == "Z")
    with pytest.raises(
        ProcessGone, match=f"^the calling process \\(pid {zombie.pid}\\) has exited$"
    ):
        exits.watch("a", zombie.pid, os.getuid())
    zombie.wait(WAIT)
    with pytest.raises(
        ProcessGone, match=f"^the calling process \\(pid {zombie.pid}\\) has exited$"
    ):
        exits.watch("a", zombie.pid, os.getuid())
    assert len(exits) == 0


def test_a_pid_from_another_pid_namespace_is_refused() -> None:
    """The kernel gives pid 0 for a peer that firewalld's pid namespace cannot see."""
    exits = Exits()
    with pytest.raises(ProcessGone, match=r"^the calling process is in another pid namespace"):
        exits.watch("a", 0, os.getuid())
    assert len(exits) == 0


def test_another_uids_process_is_refused(sleepers: list[subprocess.Popen[bytes]]) -> None:
    """A pid taken by another user's process (the caller's having exited) is not watched."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another uid")
    exits = Exits()
    nobody = start(sleepers, [*NOBODY, *SLEEPER])
    assert wait_until(lambda: _uid(nobody.pid) == 65534)
    with pytest.raises(ProcessGone, match=f"^pid {nobody.pid} is not a process of uid 1000$"):
        exits.watch("a", nobody.pid, 1000)
    exits.watch("a", nobody.pid, 65534)
    assert len(exits) == 1


def test_a_key_is_watched_once(sleepers: list[subprocess.Popen[bytes]]) -> None:
    exits = Exits()
    proc = start(sleepers, SLEEPER)
    exits.watch("a", proc.pid, os.getuid())
    with pytest.raises(ValueError, match="a is watched already"):
        exits.watch("a", proc.pid, os.getuid())
    assert len(exits) == 1


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]


def _uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("Uid:"))
    return int(line.split()[2])

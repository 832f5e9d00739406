"""The fast path's parts that need no ssh (the rest runs against a real ControlMaster in
tests/integration/test_fastpath.py): byte counts from TCP_INFO, the reset, the private
directory, a hand-over with no master there, and how a master's liveness is read."""

import asyncio
import itertools
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

import pytest
from shuttle_client.fastpath import (
    LOCK_NAME,
    UNLOCKED_GRACE,
    ControlDir,
    Forward,
    Master,
    master_options,
    open_stat,
    reset,
    running_since,
    tcp_bytes,
)

STUCK = 10.0  # not a timing assertion: how long a broken part may hang the test


def connected_pair() -> Tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    program = socket.create_connection(listener.getsockname(), timeout=STUCK)
    accepted, _ = listener.accept()
    return listener, program, accepted


def test_tcp_bytes_counts_both_ways_on_the_accepted_socket() -> None:
    listener, program, accepted = connected_pair()
    with listener, program, accepted:
        program.sendall(b"u" * 1000)
        accepted.sendall(b"d" * 3000)
        got = b""
        while len(got) < 3000:
            got += program.recv(4096)
        deadline = time.monotonic() + STUCK
        while tcp_bytes(accepted) != (1000, 3000) and time.monotonic() < deadline:
            time.sleep(0.01)  # the last ACK may still be on its way
        assert tcp_bytes(accepted) == (1000, 3000)


def test_reset_reaches_the_program_as_a_reset() -> None:
    listener, program, accepted = connected_pair()
    with listener, program:
        reset(accepted)
        program.settimeout(STUCK)
        with pytest.raises(ConnectionResetError):
            program.recv(1)


def test_the_control_directory_is_private_and_short(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = tempfile.mkdtemp(prefix="run-", dir="/tmp")  # short, as /run/user/UID is
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    control = ControlDir()
    path = control.path
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        assert os.path.dirname(path) == runtime
        # ssh adds 17 characters while it sets the socket up; sun_path holds 107 bytes.
        assert len(os.path.join(path, "m15.99").encode()) + 17 <= 107
        control.remove()
        assert not os.path.exists(path)
    finally:
        os.rmdir(runtime)
    assert master_options(f"{path}/m0") == (
        "-o",
        "ControlMaster=yes",
        "-o",
        f"ControlPath={path}/m0",
        "-o",
        "ControlPersist=no",
    )


def test_with_no_master_the_socket_stays_the_callers(tmp_path: Path) -> None:
    opened: List[Forward] = []

    async def hand_over() -> str:
        master = Master(
            str(tmp_path / "m0"),
            stream=0,
            cap=2,
            channels=itertools.count(1),
            on_open=opened.append,
            on_close=lambda forward, up, down: None,
        )
        listener, program, accepted = connected_pair()
        with listener, program, accepted:
            why = await master.open(accepted, "10.0.0.1", 80, "127.0.0.1:1")
            program.sendall(b"still ours")
            assert accepted.recv(100) == b"still ours"  # nothing read it, nothing closed it
        assert not master.forwards and master.handing == 0
        assert not master.room  # never started: no new connection is sent to it
        return why or ""

    why = asyncio.run(hand_over())
    assert "cannot reach ssh's control socket" in why
    assert not opened


HOLD_A_CONTROL_DIR = """
import sys
from shuttle_client.fastpath import ControlDir
control = ControlDir()
print(control.path, flush=True)
sys.stdin.read()
"""


def test_a_killed_clients_control_directory_goes_with_the_next_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime = tempfile.mkdtemp(prefix="run-", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", HOLD_A_CONTROL_DIR],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        killed, living = (holder.stdout.readline().strip() for holder in holders)  # type: ignore[union-attr]
        holders[0].kill()
        holders[0].wait(STUCK)
        being_made = tempfile.mkdtemp(prefix="shuttle-ssh-", dir=runtime)  # no lock yet
        forgotten = tempfile.mkdtemp(prefix="shuttle-ssh-", dir=runtime)
        old = time.time() - UNLOCKED_GRACE - 1
        os.utime(forgotten, (old, old))
        newcomer = ControlDir()
        assert not os.path.exists(killed)
        assert not os.path.exists(forgotten)
        assert os.path.exists(os.path.join(living, LOCK_NAME))
        assert os.path.isdir(being_made)
        newcomer.remove()
    finally:
        for holder in holders:
            holder.kill()
            holder.communicate(timeout=STUCK)  # and closes its pipes
        shutil.rmtree(runtime)


def test_a_running_process_is_alive_a_zombie_or_a_gone_one_is_not() -> None:
    """A master whose forwards ended is alive only while it runs and is not exiting: the
    kernel closes a dying process's descriptors after it marks it exiting, and before it is
    a zombie; a process that is gone stays gone through the descriptor that named it."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    child_stat, own = open_stat(child.pid), open_stat(os.getpid())
    assert child_stat is not None and own is not None
    try:
        since = running_since(child_stat)
        assert since is not None and since == running_since(child_stat)
        assert running_since(own) is not None
    finally:
        assert child.stdin is not None
        child.stdin.close()
        os.close(own)
    try:
        exited = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # a zombie: not reaped
        assert exited is not None and exited.si_pid == child.pid
        assert running_since(child_stat) is None
        child.wait()
        assert running_since(child_stat) is None
        assert open_stat(child.pid) is None
    finally:
        os.close(child_stat)

"""One-shot root through sudo: a user who is in no shuttle group, with no firewalld service
running, and a NOPASSWD sudoers entry made by `shuttle-firewalld --sudoers`, runs one
`shuttle-client -r ... SUBNET`. The client starts its private firewalld with sudo -n (the
test has no terminal), curl reaches the target, and once the client is gone (Ctrl-C, or
SIGKILL) nothing is left: no firewalld or sudo process, no socket file, no rule.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Iterator, List

import pytest
from shuttle_client.cli import DEFAULT_FIREWALLD
from shuttle_client.private_firewalld import nobody_answers

from testbed import T_ADDR, LocalUser, Shuttle, Topology, UserVenv
from testbed.procs import Proc, run, wait_until
from testbed.shuttle import CLIENT_READY, READY_TIMEOUT, leftovers, wait_rules_gone

from .checks import assert_page

pytestmark = pytest.mark.integration

PRIVATE = re.compile(r"private shuttle-firewalld listening on (/run/shuttle-oneshot/(\d+)\.sock)")
GONE_WAIT = 15.0  # seconds: the private firewalld's lease (6 s) and its clean exit, generous


@pytest.fixture
def sudoers(user_venv: UserVenv, local_user: LocalUser) -> Iterator[Path]:
    """The test user's sudoers entry, as `shuttle-firewalld --sudoers USER` prints it,
    checked by visudo and removed after the test."""
    assert shutil.which("sudo") and shutil.which("visudo"), "the test needs sudo (make apt)"
    text = run(
        [user_venv.program("shuttle-firewalld"), "--sudoers", local_user.name],
        timeout=30,
        check=True,
    ).stdout
    path = Path(f"/etc/sudoers.d/shuttle-oneshot-test-{os.getpid()}")
    path.write_text(text)
    try:
        path.chmod(0o440)
        run(["visudo", "-c", "-f", str(path)], timeout=30, check=True)
        yield path
    finally:
        path.unlink()


def oneshot_processes(topo: Topology) -> List[str]:
    """The command lines of one-shot firewalld processes (and their sudo) in C."""
    found = []
    for pid in topo.c.pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if b"--one-shot" in argv:
            found.append(f"{pid}: {b' '.join(argv).decode(errors='replace')}")
    return found


def start_client(shuttle: Shuttle) -> tuple[Proc, str]:
    """shuttle-client without --firewalld, as the test user; (it, its private socket)."""
    args = shuttle.client_args()
    at = args.index("--firewalld")
    del args[at : at + 2]
    topo = shuttle.topo
    argv = topo.user_argv(args, topo.user_env([str(shuttle.venv.bin)]))
    proc = topo.start(f"client{len(shuttle.clients)}", argv)
    shuttle.clients.append(proc)
    assert proc.wait_for_line(CLIENT_READY, READY_TIMEOUT), (
        f"not ready within {READY_TIMEOUT}s\n{shuttle.outputs()}"
    )
    match = PRIVATE.search(proc.output())
    assert match, f"no private firewalld started:\n{proc.output()}"
    return proc, match.group(1)


def assert_nothing_left(shuttle: Shuttle, socket: str) -> None:
    topo = shuttle.topo
    assert not wait_rules_gone(topo, GONE_WAIT), f"rules left: {leftovers(topo)}"
    gone = wait_until(lambda: not oneshot_processes(topo), GONE_WAIT, 0.2)
    assert gone, f"left running: {oneshot_processes(topo)}\n{shuttle.outputs()}"
    for path in (socket, socket + ".fds"):
        assert not os.path.exists(path), f"{path} left behind"


def test_one_command_through_sudo(topo: Topology, user_venv: UserVenv, sudoers: Path) -> None:
    shuttle = Shuttle(topo, user_venv)
    assert nobody_answers(DEFAULT_FIREWALLD), "a firewalld service runs: the test needs none"
    groups = [group.gr_name for group in grp.getgrall() if topo.user.name in group.gr_mem]
    assert "shuttle" not in groups, "the user must be in no shuttle group"

    # Ctrl-C: the terminal signals the client's whole process group, sudo and firewalld too.
    client, socket = start_client(shuttle)
    assert os.stat(socket).st_uid == topo.user.uid, "the private socket is the user's alone"
    assert_page(shuttle, T_ADDR)
    os.killpg(client.pid, signal.SIGINT)
    assert client.wait(20) == 0, shuttle.outputs()
    assert_nothing_left(shuttle, socket)

    # SIGKILL: the client cannot close its session; firewalld sees its stdin close.
    client, socket = start_client(shuttle)
    assert_page(shuttle, T_ADDR)
    client.send(signal.SIGKILL)
    assert client.wait(10) == -signal.SIGKILL
    assert_nothing_left(shuttle, socket)

    # The private firewalld killed: the client cannot open its session again there, so it
    # says so and exits rather than wait for it. The rules stay (the kill switch), until a
    # firewalld that is not one-shot starts and removes them as a crashed run's.
    client, socket = start_client(shuttle)
    pid = int(PRIVATE.search(client.output()).group(2))  # type: ignore[union-attr]
    os.kill(pid, signal.SIGKILL)
    assert client.wait(20) == 1, shuttle.outputs()
    assert "the private shuttle-firewalld exits with it" in client.output()
    assert "Traceback" not in client.output()
    assert leftovers(topo), "a killed firewalld cannot remove its rules"
    shuttle.start_firewalld()
    assert shuttle.stop_firewalld() == []
    assert os.path.exists(socket), "nor its socket files: the next one-shot removes them"
    client, _ = start_client(shuttle)
    client.send(signal.SIGTERM)
    assert client.wait(20) == 0, shuttle.outputs()
    assert_nothing_left(shuttle, socket)

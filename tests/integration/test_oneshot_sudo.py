"""One-shot root through sudo: a user who is in no shuttle group, with no firewalld service
running, and a NOPASSWD sudoers entry made by `shuttle-firewalld --sudoers`, runs one
`shuttle-client -r ... SUBNET`. The client starts its private firewalld with sudo -n (the
test has no terminal), curl reaches the target, and once the client is gone (Ctrl-C, or
SIGKILL) nothing is left: no firewalld or sudo process, no socket file, no rule. And on a
terminal, with a sudoers entry that asks for the password: sudo's prompt appears there, the
password typed gets the tunnel, and Ctrl-C typed there leaves nothing.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Iterator, List, Optional

import pytest
from shuttle_client.cli import DEFAULT_FIREWALLD
from shuttle_client.private_firewalld import nobody_answers

from testbed import HTTP_PORT, T_ADDR, LocalUser, Shuttle, Topology, UserVenv
from testbed.locks import locked
from testbed.netns import Namespace
from testbed.procs import Proc, run, wait_until
from testbed.shuttle import CLIENT_READY, READY_TIMEOUT, leftovers, wait_rules_gone
from testbed.topology import UserFiles, curl_argv
from testbed.user import ACCOUNTS_LOCK

from .checks import TUNNEL_WAIT, assert_page, rules_in

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


def oneshot_processes(ns: Namespace) -> List[str]:
    """The command lines of one-shot firewalld processes (and their sudo) in ns."""
    found = []
    for pid in ns.pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if b"--one-shot" in argv:
            found.append(f"{pid}: {b' '.join(argv).decode(errors='replace')}")
    return found


def start_client(shuttle: Shuttle, ns: Optional[Namespace] = None) -> tuple[Proc, str]:
    """shuttle-client without --firewalld, as the test user, in ns (default C); (it, its
    private socket)."""
    args = shuttle.client_args()
    at = args.index("--firewalld")
    del args[at : at + 2]
    topo = shuttle.topo
    argv = (ns or topo.c).argv(topo.user.argv(args, topo.user_env([str(shuttle.venv.bin)])))
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
    gone = wait_until(lambda: not oneshot_processes(topo.c), GONE_WAIT, 0.2)
    assert gone, f"left running: {oneshot_processes(topo.c)}\n{shuttle.outputs()}"
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


def test_a_client_in_another_namespace_gets_its_rules_there(
    topo: Topology, user_venv: UserVenv, sudoers: Path, side_ns: Namespace
) -> None:
    # sudo starts the private firewalld in the client's namespace, so the rules go there.
    shuttle = Shuttle(topo, user_venv)
    assert nobody_answers(DEFAULT_FIREWALLD), "a firewalld service runs: the test needs none"
    client, socket = start_client(shuttle, side_ns)
    assert oneshot_processes(side_ns), shuttle.outputs()
    assert rules_in(side_ns) != []
    assert leftovers(topo) == [], "C got rules"
    done = side_ns.run(topo.user.argv(curl_argv(T_ADDR, HTTP_PORT, TUNNEL_WAIT), topo.user_env()))
    assert done.returncode == 0, f"{done.stderr}\n{shuttle.outputs()}"
    assert topo.marker in done.stdout
    os.killpg(client.pid, signal.SIGINT)
    assert client.wait(20) == 0, shuttle.outputs()
    assert wait_until(lambda: rules_in(side_ns) == [], GONE_WAIT, 0.2), rules_in(side_ns)
    gone = wait_until(lambda: not oneshot_processes(side_ns), GONE_WAIT, 0.2)
    assert gone, f"left running: {oneshot_processes(side_ns)}\n{shuttle.outputs()}"
    for path in (socket, socket + ".fds"):
        assert not os.path.exists(path), f"{path} left behind"


PASSWORD = secrets.token_urlsafe(12)  # a throwaway user's, for the length of one test


@pytest.fixture
def password_user(topo: Topology) -> Iterator[LocalUser]:
    """A throwaway local user with PASSWORD, in no shuttle group, with a copy of the test
    user's ssh key (S lets the test user log in with it) and a runtime directory; removed
    after the test, with sudo's record of it."""
    name = f"shpw{os.getpid()}"
    with locked(ACCOUNTS_LOCK, timeout=120):
        run(["useradd", "--create-home", "--user-group", "--shell", "/bin/sh", name], timeout=30)
        run(["chpasswd"], timeout=30, check=True, stdin=f"{name}:{PASSWORD}\n".encode())
    try:
        entry = pwd.getpwnam(name)
        user = LocalUser(name, entry.pw_uid, entry.pw_gid, name, Path(entry.pw_dir))
        files = UserFiles(user, topo.run_dir / name)
        files.dir.mkdir(mode=0o700)
        files.runtime_dir.mkdir(mode=0o700)
        shutil.copyfile(topo.key, files.key)
        for path in (files.dir, files.runtime_dir, files.key):
            os.chown(path, user.uid, user.gid)
        files.key.chmod(0o600)
        yield user
    finally:
        with locked(ACCOUNTS_LOCK, timeout=120):
            run(["userdel", "--remove", name], timeout=30)
        Path(f"/run/sudo/ts/{name}").unlink(missing_ok=True)


class Terminal:
    """A process on a pseudo-terminal of its own, its controlling terminal: what it writes
    there is read by a thread as it comes (so it never blocks on a full terminal); every wait
    for text is bounded by timeout."""

    def __init__(self, argv: List[str], cwd: Path) -> None:
        self.master, slave = os.openpty()
        # A new session whose controlling terminal it is, as a login's: sudo asks there. Not
        # a group leader, setsid(1) execs argv itself (its pid is ours), and --wait covers
        # the other case.
        self.popen = subprocess.Popen(
            ["setsid", "--ctty", "--wait", *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
        )
        os.close(slave)
        self._seen = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: every process let go of the terminal
                return
            if not data:
                return
            with self._lock:
                self._seen += data

    def output(self) -> str:
        with self._lock:
            return self._seen.decode(errors="replace")

    def wait_for(self, text: str, timeout: float) -> bool:
        return wait_until(lambda: text in self.output(), timeout, 0.1)

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)
        self._reader.join(10)
        os.close(self.master)


def test_sudo_asks_for_the_password_on_the_terminal(
    topo: Topology, user_venv: UserVenv, password_user: LocalUser
) -> None:
    user = password_user
    shuttle = Shuttle(topo, user_venv)
    assert nobody_answers(DEFAULT_FIREWALLD), "a firewalld service runs: the test needs none"
    # The one-shot command line only, and with a password: sudo's own default.
    text = run(
        [user_venv.program("shuttle-firewalld"), "--sudoers", user.name], timeout=30, check=True
    ).stdout
    assert "NOPASSWD: " in text
    sudoers = Path(f"/etc/sudoers.d/shuttle-prompt-test-{os.getpid()}")
    sudoers.write_text(text.replace("NOPASSWD: ", ""))
    files = UserFiles(user, topo.run_dir / user.name)
    args = shuttle.client_args(login=topo.user.name)
    at = args.index("--firewalld")
    del args[at : at + 2]
    args[args.index("-e") + 1] = topo.ssh_command().replace(str(topo.key), str(files.key))
    env = {"PATH": f"{user_venv.bin}:/usr/bin:/bin", "XDG_RUNTIME_DIR": str(files.runtime_dir)}
    terminal: Terminal | None = None
    try:
        sudoers.chmod(0o440)
        run(["visudo", "-c", "-f", str(sudoers)], timeout=30, check=True)
        terminal = Terminal(topo.c.argv(user.argv(args, env)), files.dir)
        assert terminal.wait_for(f"password for {user.name}", READY_TIMEOUT), terminal.output()
        terminal.type(PASSWORD + "\r")
        assert terminal.wait_for(CLIENT_READY, READY_TIMEOUT), terminal.output()
        match = PRIVATE.search(terminal.output())
        assert match, f"no private firewalld started:\n{terminal.output()}"
        curl = topo.c.run(user.argv(curl_argv(T_ADDR, HTTP_PORT, TUNNEL_WAIT), env))
        assert curl.returncode == 0, f"{curl.stderr}\n{terminal.output()}"
        assert topo.marker in curl.stdout
        terminal.type("\x03")  # Ctrl-C, as a user types it
        assert terminal.popen.wait(20) == 0, terminal.output()
        assert "Traceback" not in terminal.output()
        assert_nothing_left(shuttle, match.group(1))
    finally:
        if terminal is not None:
            terminal.close()
        sudoers.unlink()

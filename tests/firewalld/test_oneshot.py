"""The one-shot mode (a private firewalld for one caller, as shuttle-client starts it
through sudo) and --sudoers, with the real daemon in a namespace, a real sudo and a real
sudoers file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import select
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from shuttle_client.firewall_session import FirewallError, FirewallSession
from shuttle_firewalld import oneshot
from shuttle_firewalld.errors import StartupError
from shuttle_local.oneshot import LISTENING, ONE_SHOT_DIR
from shuttle_protocol.zap import Peer

from .daemon import FIREWALLD, IP, WAIT, Listener, nft, nothing_of_shuttle

SUDO_USER = "nobody"  # a real account, in no shuttle group, whose sudoers entry we make


class OneShot:
    """`shuttle-firewalld --one-shot` as root in a namespace; its stdin is our pipe."""

    def __init__(self, netns: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [IP, "netns", "exec", netns, FIREWALLD, "--one-shot", "-v"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=out,
                env={**os.environ, **(env or {})},
            )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], WAIT)
        line = self.proc.stdout.readline().decode() if ready else ""
        self.path = line[len(LISTENING) :].strip() if line.startswith(LISTENING) else ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self) -> int | None:
        try:
            return self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(WAIT)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def one_shot(netns: str, tmp_path: Path) -> Iterator[type[OneShot]]:
    started: list[OneShot] = []

    def start(env: dict[str, str] | None = None) -> OneShot:
        daemon = OneShot(netns, tmp_path / f"oneshot{len(started)}.log", env)
        started.append(daemon)
        assert daemon.path, f"no listening line:\n{daemon.output()}"
        return daemon

    try:
        yield start  # type: ignore[misc]
    finally:
        for daemon in started:
            daemon.stop()


def open_session(daemon: OneShot, port: int) -> FirewallSession:
    """A session of ours on daemon; a failure shows what the daemon logged meanwhile.

    Within WAIT, not the client's 5 s: CI runs under a loaded make test have had no answer
    within 5 s, and the daemon's log showed no connection (its ZAP handler logs each one).
    The client's message now says whether the handshake was made, should it happen again."""
    session = FirewallSession(daemon.path)
    try:
        asyncio.run(session.open("nft", port, ["10.0.0.0/8"], [], timeout=WAIT))
    except FirewallError as exc:
        pytest.fail(f"{exc}\nthe one-shot firewalld's log:\n{daemon.output()}")
    return session


@pytest.mark.integration
def test_it_serves_the_sudo_caller_on_a_socket_of_its_own(one_shot: type[OneShot]) -> None:
    uid = pwd.getpwnam(SUDO_USER).pw_uid
    daemon = one_shot(env={"SUDO_UID": str(uid)})
    assert os.path.dirname(daemon.path) == ONE_SHOT_DIR
    for path in (daemon.path, daemon.path + ".fds"):
        info = os.lstat(path)
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (uid, 0, 0o660)
    directory = os.lstat(ONE_SHOT_DIR)
    assert (directory.st_uid, stat.S_IMODE(directory.st_mode)) == (0, 0o755)
    assert daemon.proc.stdin is not None
    daemon.proc.stdin.close()  # the client is gone
    assert daemon.wait() == 0, daemon.output()
    assert "stopping: the client went away" in daemon.output()
    assert not os.path.exists(daemon.path) and not os.path.exists(daemon.path + ".fds")


@pytest.mark.integration
def test_it_exits_when_the_session_ends_and_leaves_others_rules(
    netns: str, one_shot: type[OneShot], listen: Callable[..., Listener]
) -> None:
    # Another firewalld's table, alive: a one-shot must not take it for a crashed run's.
    nft(netns, "add", "table", "inet", "shuttle-00000000000000000000000000000000")
    listen(12300)
    try:
        daemon = one_shot()  # root, without sudo: it serves root
        session = open_session(daemon, 12300)
        tables = nft(netns, "list", "tables")
        assert tables.count("table inet shuttle-") == 2, tables
        asyncio.run(session.close())
        assert daemon.wait() == 0, daemon.output()
        assert "stopping: the caller's session ended" in daemon.output()
        assert nft(netns, "list", "tables").count("table inet shuttle-") == 1
        assert "tproxy" not in daemon.output() or "nft and nat only" in daemon.output()
    finally:
        nft(netns, "delete", "table", "inet", "shuttle-00000000000000000000000000000000")
    assert nothing_of_shuttle(netns)


@pytest.mark.integration
def test_a_killed_client_s_rules_go_with_its_pipe(
    netns: str, one_shot: type[OneShot], listen: Callable[..., Listener]
) -> None:
    listen(12300)
    daemon = one_shot()
    assert daemon.proc.poll() is None, daemon.output()
    session = open_session(daemon, 12300)  # not closed, as by a client killed with SIGKILL
    assert not nothing_of_shuttle(netns)
    assert daemon.proc.stdin is not None
    daemon.proc.stdin.close()
    assert daemon.wait() == 0, daemon.output()
    assert nothing_of_shuttle(netns)
    asyncio.run(session.close())  # our socket: firewalld is gone, there is nothing to close


@pytest.mark.integration
def test_a_bad_sudo_uid_is_one_line(netns: str, tmp_path: Path) -> None:
    daemon = OneShot(netns, tmp_path / "log", {"SUDO_UID": "0; rm"})
    try:
        assert daemon.wait() == 1
        assert daemon.output() == "shuttle-firewalld: SUDO_UID is not a uid: '0; rm'\n"
    finally:
        daemon.stop()


def test_only_the_caller_and_root_may_connect() -> None:
    admit = oneshot.admit_only(1234)
    assert admit(Peer(1234, 5, 6)) is None
    assert admit(Peer(0, 0, 6)) is None
    assert admit(Peer(1235, 1234, 6)) == "uid 1235: this one-shot firewalld serves uid 1234 only"


def test_the_caller_uid_comes_from_sudo_or_is_root() -> None:
    assert oneshot.caller_uid({}) == 0
    assert oneshot.caller_uid({"SUDO_UID": "1000"}) == 1000
    for bad in ("", "-1", "1e3", str(2**32 - 1)):
        with pytest.raises(StartupError, match="SUDO_UID is not a uid"):
            oneshot.caller_uid({"SUDO_UID": bad})


def test_a_directory_anyone_may_change_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    for path in (link, open_dir):
        with pytest.raises(StartupError, match="a directory of root's that only root may write"):
            oneshot.prepare_directory(str(path))
    made = tmp_path / "made"
    umask = os.umask(0o077)  # sudo keeps the user's umask: the directory must not inherit it
    try:
        oneshot.prepare_directory(str(made))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(made.stat().st_mode) == 0o755


def gone_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_a_killed_one_shot_s_socket_files_go_a_live_one_s_stay(tmp_path: Path) -> None:
    gone = gone_pid()
    with contextlib.ExitStack() as stack:
        dead, live, starting, own = (
            stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) for _ in range(4)
        )
        dead.bind(str(tmp_path / f"{gone}.sock"))  # bound, nobody listening: a killed one's
        live.bind(str(tmp_path / f"{os.getppid()}.sock"))
        live.listen(1)
        # Bound and not listening yet, by a process that runs: one starting beside us.
        starting.bind(str(tmp_path / f"{os.getppid()}.sock.fds"))
        own.bind(str(tmp_path / f"{os.getpid()}.sock"))  # our pid's, left by an earlier one
        (tmp_path / "13.sock").write_text("")  # not a socket: not ours to remove
        assert oneshot.remove_dead_sockets(str(tmp_path)) == 2
        assert sorted(os.listdir(tmp_path)) == sorted(
            ["13.sock", f"{os.getppid()}.sock", f"{os.getppid()}.sock.fds"]
        )


def test_caller_ends_with_its_session_or_its_pipe() -> None:
    read, write = os.pipe()
    try:
        caller = oneshot.Caller(read)
        assert caller.follows_pipe
        assert not caller.finished()
        caller.sessions(0)  # no session yet: still waiting for the first
        assert not caller.finished()
        caller.sessions(1)
        os.write(write, b"noise")  # whatever comes is dropped
        assert not caller.finished()
        os.close(write)
        write = -1
        assert caller.finished() and caller.why == "the client went away"
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
    with open(os.devnull, "rb") as null:  # not a pipe: only the session counts
        caller = oneshot.Caller(null.fileno())
        assert not caller.follows_pipe
        caller.sessions(1)
        assert not caller.finished()
        caller.sessions(0)
        assert caller.finished() and caller.why == "the caller's session ended"


@pytest.fixture
def sudoers_file() -> Iterator[Path]:
    """A file in /etc/sudoers.d of this test's own, removed after it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    path = Path(f"/etc/sudoers.d/shuttle-fwt-{os.getpid()}")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def run_as(user: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    entry = pwd.getpwnam(user)
    return subprocess.run(
        [
            *("setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"),
            *("env", "-i", "PATH=/usr/bin:/bin", *argv),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.integration
def test_the_sudoers_line_allows_exactly_the_one_shot_command(sudoers_file: Path) -> None:
    made = subprocess.run(
        [FIREWALLD, "--sudoers", SUDO_USER], capture_output=True, text=True, timeout=30, check=False
    )
    assert made.returncode == 0, made.stderr
    assert "sshuttle #631" in made.stdout
    rule = f"{SUDO_USER} ALL=(root) NOPASSWD: {FIREWALLD} --one-shot\n"
    assert made.stdout.endswith(rule)
    sudoers_file.write_text(made.stdout)
    sudoers_file.chmod(0o440)
    check = subprocess.run(
        ["visudo", "-c", "-f", str(sudoers_file)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # sudo -l names a command that is allowed without a password, and exits 0.
    allowed = run_as(SUDO_USER, ["sudo", "-n", "-l", FIREWALLD, "--one-shot"])
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip() == f"{FIREWALLD} --one-shot"
    for other in (
        [FIREWALLD, "--one-shot", "-v"],
        [FIREWALLD, "--socket=/etc/passwd"],
        [FIREWALLD],
        ["/bin/sh"],
    ):
        refused = run_as(SUDO_USER, ["sudo", "-n", "-l", *other])
        assert refused.returncode != 0, f"sudo allows {other}"


def test_sudoers_refuses_names_that_are_not_accounts() -> None:
    for who, complaint in (
        ("no-such-user-here", "no such user: no-such-user-here"),
        ("%no-such-group-here", "no such group: %no-such-group-here"),
        ("ALL", "no such user: ALL"),
        ("a b", "not a user or %group name"),
        ("x,y", "not a user or %group name"),
    ):
        with pytest.raises(StartupError, match=complaint):
            oneshot.sudoers_line(who, {})


def test_sudoers_refuses_a_program_others_may_change() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        script = Path(directory) / "shuttle-firewalld"
        script.write_text("#!/usr/bin/python3\n")
        os.chown(directory, pwd.getpwnam(SUDO_USER).pw_uid, -1)
        with pytest.raises(StartupError, match="is not root's alone"):
            oneshot._check_roots_only(str(script))

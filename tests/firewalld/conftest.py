"""Fixtures for firewalld's tests: fakes for the unit tests, and for the real ones a fresh
network namespace with the real shuttle-firewalld running inside it.

Everything a fixture starts, it stops and removes on teardown, whether the test passed or
not; every wait is bounded.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
from shuttle_firewalld.sessions import Session, Sessions
from shuttle_protocol.frames import decode_frame
from shuttle_protocol.schema import Message

VENV_BIN = Path(sys.executable).parent
FIREWALLD = str(VENV_BIN / "shuttle-firewalld")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
WAIT = 10.0  # the longest any test waits for the daemon to do something


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll predicate until it is true or timeout passes; whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- unit-test fakes -------------------------------------------------------------------


class FakeMethod:
    """A firewall method that records what it was asked to do."""

    def __init__(self) -> None:
        self.applied: list[Session] = []
        self.removed: list[Session] = []
        self.fail_apply: Exception | None = None
        self.fail_remove: Exception | None = None

    def apply(self, session: Session) -> int:
        if self.fail_apply is not None:
            raise self.fail_apply
        self.applied.append(session)
        return len(session.subnets) + 1

    def remove(self, session: Session) -> None:
        self.removed.append(session)
        if self.fail_remove is not None:
            raise self.fail_remove

    def remove_stale(self) -> int:
        return 0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# Port 12300 is listened on by uid 1000, port 12301 by uid 0.
LISTENERS = {12300: {1000}, 12301: {0}}


@pytest.fixture
def method() -> FakeMethod:
    return FakeMethod()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sessions(method: FakeMethod, clock: FakeClock) -> Sessions:
    return Sessions(
        {"nat": method}, 6.0, owners_of_port=lambda port: LISTENERS.get(port, set()), clock=clock
    )


# --- real daemon in a network namespace -----------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace with loopback up, deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"shuttle-fwt-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory any uid can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="shuttle-fwt-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def nat_rules(netns: str) -> list[str]:
    """The namespace's nat table as iptables-save prints it, without comments."""
    saved = subprocess.run(
        ["ip", "netns", "exec", netns, "iptables-save", "-t", "nat"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return [line for line in saved.splitlines() if not line.startswith("#")]


def shuttle_rules(netns: str) -> list[str]:
    return [line for line in nat_rules(netns) if "SHUTTLE-" in line]


class Daemon:
    """shuttle-firewalld running in a namespace, its stderr collected line by line."""

    def __init__(self, netns: str, socket_path: Path, group: str, lease: float) -> None:
        self.socket_path = socket_path
        argv = [FIREWALLD, f"--socket={socket_path}", f"--group={group}", f"--lease={lease:g}"]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv, "-v"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, start: str) -> None:
        if not wait_until(lambda: any(line.startswith(start) for line in self.lines)):
            raise AssertionError(f"firewalld never logged {start!r}; its log:\n{self.log}")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not end in time; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self._reader.join(WAIT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode


@pytest.fixture
def start_firewalld(netns: str, socket_dir: Path) -> Iterator[Callable[..., Daemon]]:
    """Start shuttle-firewalld in the namespace and wait until it listens."""
    daemons: list[Daemon] = []

    def start(group: str = "root", lease: float = 2) -> Daemon:
        daemon = Daemon(netns, socket_dir / "firewalld.sock", group, lease)
        daemons.append(daemon)
        daemon.wait_for_line(f"shuttle-firewalld: listening on ipc://{daemon.socket_path}")
        return daemon

    try:
        yield start
    finally:
        for daemon in daemons:
            daemon.stop()


class Listener:
    """A TCP listener on 127.0.0.1:port inside the namespace, as root or as nobody."""

    SCRIPT = (
        "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])));"
        " s.listen(); print('ready', flush=True); sys.stdin.read()"
    )

    def __init__(self, netns: str, port: int, as_nobody: bool) -> None:
        user = NOBODY if as_nobody else []
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *user, sys.executable, "-c", self.SCRIPT, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()  # returns at EOF too, if the listener fails
        if ready != "ready\n":
            self.close()
            raise AssertionError(f"listener on port {port} did not start")

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()  # EOF on stdin ends the listener
        try:
            self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(WAIT)


@pytest.fixture
def listen(netns: str) -> Iterator[Callable[..., Listener]]:
    listeners: list[Listener] = []

    def start(port: int, as_nobody: bool = False) -> Listener:
        listener = Listener(netns, port, as_nobody)
        listeners.append(listener)
        return listener

    try:
        yield start
    finally:
        for listener in listeners:
            listener.close()


def ask(socket_path: Path, *frames: bytes, timeout: float = WAIT) -> tuple[int, Message]:
    """Send one raw request (one or more frames) on a fresh DEALER; the decoded answer."""
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    try:
        dealer.connect(f"ipc://{socket_path}")
        dealer.send_multipart(list(frames))
        if not dealer.poll(int(timeout * 1000)):
            raise AssertionError("no answer from firewalld")
        return decode_frame(dealer.recv())
    finally:
        dealer.close()
        context.term()

"""The real shuttle-firewalld in a network namespace: the daemon as a process, a listener
of another uid, one raw request, and what the firewall holds (nat, nft)."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import zmq
from shuttle_protocol.frames import decode_frame
from shuttle_protocol.schema import Message

VENV_BIN = Path(sys.executable).parent
FIREWALLD = str(VENV_BIN / "shuttle-firewalld")
IP = shutil.which("ip") or "/usr/sbin/ip"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
WAIT = 10.0  # the longest any test waits for the daemon to do something
LEASE = 60.0  # the daemon's lease unless a test asks for another


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Poll predicate until it is true or timeout passes; whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _saved(netns: str, tool: str, table: str = "nat") -> list[str]:
    saved = subprocess.run(
        ["ip", "netns", "exec", netns, tool, "-t", table],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return [line for line in saved.splitlines() if not line.startswith("#")]


def nat_rules(netns: str) -> list[str]:
    """The namespace's nat table as iptables-save prints it, without comments."""
    return _saved(netns, "iptables-save")


def nat6_rules(netns: str) -> list[str]:
    """The namespace's IPv6 nat table as ip6tables-save prints it, without comments."""
    return _saved(netns, "ip6tables-save")


def guard_rules(netns: str) -> list[str]:
    """The filter table's lines of the nat method (its shortcuts' guards), IPv4 then IPv6."""
    saved = _saved(netns, "iptables-save", "filter") + _saved(netns, "ip6tables-save", "filter")
    return [line for line in saved if "SHUTTLE-" in line]


def shuttle_rules(netns: str) -> list[str]:
    """The nat method's lines, IPv4 then IPv6, then those of its guards."""
    nat = [line for line in nat_rules(netns) + nat6_rules(netns) if "SHUTTLE-" in line]
    return nat + guard_rules(netns)


def nft(netns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "nft", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def shuttle_tables(netns: str) -> list[str]:
    """The nft method's tables (names only)."""
    return [
        line.split()[2]
        for line in nft(netns, "list", "tables").splitlines()
        if line.startswith("table inet shuttle-")
    ]


def nft_set_sizes(netns: str, table: str) -> dict[str, int]:
    """How many elements each set of the table holds."""
    listing = json.loads(nft(netns, "-j", "list", "table", "inet", table))
    return {
        item["set"]["name"]: len(item["set"].get("elem", []))
        for item in listing["nftables"]
        if "set" in item
    }


def nothing_of_shuttle(netns: str) -> bool:
    return shuttle_rules(netns) == [] and shuttle_tables(netns) == []


class Daemon:
    """shuttle-firewalld running in a namespace, its stderr collected line by line."""

    def __init__(
        self,
        netns: str,
        socket_path: Path,
        group: str,
        lease: float,
        policy: Path,
        *,
        env: dict[str, str] | None = None,
        hosts_file: Path,
        wrap: Sequence[str] = (),
    ) -> None:
        """wrap: a command that runs firewalld's (setpriv with its options, say)."""
        self.socket_path = socket_path
        self.hosts_file = hosts_file
        argv = [
            FIREWALLD,
            f"--socket={socket_path}",
            f"--group={group}",
            f"--lease={lease:g}",
            f"--policy={policy}",
            f"--hosts-file={hosts_file}",
        ]
        self.proc = subprocess.Popen(
            [IP, "netns", "exec", netns, *wrap, *argv, "-v"],  # IP: env may have another PATH
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert self.proc.stderr is not None
        self._stderr = self.proc.stderr.fileno()
        os.set_blocking(self._stderr, False)
        self._output = bytearray()
        self._ended = False
        self._lock = threading.Lock()
        # Keeps the pipe drained while nobody looks, so a chatty daemon never blocks on it.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        """Take in what the pipe holds now (with the lock held: chunks stay in order)."""
        while not self._ended:
            try:
                chunk = os.read(self._stderr, 65536)
            except BlockingIOError:
                return
            self._output += chunk
            self._ended = not chunk

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self._stderr, select.POLLIN)
        while not self._ended:
            poller.poll()
            with self._lock:
                self._drain()

    @property
    def lines(self) -> list[str]:
        """Every line the daemon wrote before this call: what it logged before it answered a
        request is here once the answer is in, however far behind the reader thread is."""
        with self._lock:
            self._drain()
            return self._output.decode(errors="replace").splitlines()

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


LISTENER = """\
import select, socket, sys
port, protocol, v6only, addresses = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
has_v4 = any(":" not in address for address in addresses)
kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
sockets = []
for address in addresses:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, kind)
    # Beside an IPv4 socket, :: must be IPv6 only; or when asked.
    if family == socket.AF_INET6 and (has_v4 or v6only == "v6only"):
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address, port))
    if protocol == "tcp":
        sock.listen(64)
    sockets.append(sock)
print("ready", flush=True)
udp = sockets if protocol == "udp" else []
while True:
    readable = select.select([sys.stdin, *udp], [], [])[0]
    if sys.stdin in readable:  # EOF: the test is done
        break
    for sock in readable:
        data, peer = sock.recvfrom(2048)
        sock.sendto(b"echo " + data, peer)
"""


class Listener:
    """TCP listeners on port inside the namespace (127.0.0.1 unless told), as root or nobody;
    or with protocol "udp", UDP sockets that echo each datagram back, prefixed with "echo ".
    v6only: the IPv6 ones are IPV6_V6ONLY even without an IPv4 one beside them.

    Nothing accepts TCP: the kernel completes connections into the backlog, which is all a
    connecting test needs to see.
    """

    def __init__(
        self,
        netns: str,
        port: int,
        as_nobody: bool,
        addresses: tuple[str, ...] = ("127.0.0.1",),
        protocol: str = "tcp",
        *,
        v6only: bool = False,
    ) -> None:
        user = NOBODY if as_nobody else []
        only = "v6only" if v6only else "dual"
        argv = [sys.executable, "-c", LISTENER, str(port), protocol, only, *addresses]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *user, *argv],
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

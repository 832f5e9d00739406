"""Fixtures for firewalld's tests: fakes for the unit tests, and for the real ones a fresh
network namespace with the real shuttle-firewalld running inside it.

Everything a fixture starts, it stops and removes on teardown, whether the test passed or
not; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import zmq
from shuttle_client.firewall_session import FirewallError, FirewallSession
from shuttle_firewalld.policy import Policy
from shuttle_firewalld.ports import Listener as ListeningSocket
from shuttle_firewalld.session import Session
from shuttle_firewalld.sessions import Sessions
from shuttle_firewalld.targets import Target as Targeted
from shuttle_firewalld.transparent import Flow
from shuttle_protocol.firewall_messages import ALL_PORTS, ANY_OWNER, OpenSessionRequest, Target
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


# --- unit-test fakes -------------------------------------------------------------------


class FakeMethod:
    """A firewall method that records what it was asked to do."""

    makes_sockets = False

    def __init__(self) -> None:
        self.applied: list[Session] = []
        self.updated: list[tuple[Session, tuple[Targeted, ...], tuple[Targeted, ...]]] = []
        self.removed: list[Session] = []
        self.fail_apply: Exception | None = None
        self.fail_update: Exception | None = None
        self.fail_remove: Exception | None = None

    def apply(self, session: Session) -> int:
        if self.fail_apply is not None:
            raise self.fail_apply
        self.applied.append(session)
        return len(session.subnets) + 1

    def update(
        self, session: Session, subnets: tuple[Targeted, ...], excludes: tuple[Targeted, ...]
    ) -> int:
        if self.fail_update is not None:
            raise self.fail_update
        self.updated.append((session, subnets, excludes))
        return len(subnets) + 1

    def remove(self, session: Session) -> None:
        self.removed.append(session)
        if self.fail_remove is not None:
            raise self.fail_remove

    def remove_stale(self) -> int:
        return 0


class FakeTproxy(FakeMethod):
    """A tproxy method that makes ordinary, unbound sockets instead of transparent ones."""

    makes_sockets = True

    def apply(self, session: Session) -> int:
        rules = super().apply(session)
        session.port = 41000
        session.sockets = {
            f"{kind}{version}": socket.socket(
                socket.AF_INET if version == 4 else socket.AF_INET6,
                socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM,
            )
            for version in session.versions
            for kind in ("tcp", "udp")
        }
        return rules

    def remove(self, session: Session) -> None:
        for sock in session.sockets.values():
            sock.close()
        session.sockets = {}
        super().remove(session)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def listening(
    port: int, uid: int, *addresses: str, protocol: str = "tcp", v6only: bool = False
) -> list[ListeningSocket]:
    """Sockets as ports.sockets_on describes them; v6only: the IPv6 ones are IPV6_V6ONLY."""
    return [
        ListeningSocket(ipaddress.ip_address(a), port, uid, protocol, v6only and ":" in a)
        for a in addresses
    ]


# Port 12300: uid 1000 on both loopbacks; 12301: uid 0 on 127.0.0.1; 12302: uid 1000 on the
# wildcard addresses; 12303: uid 1000 on 127.0.0.1 only; 12304: uid 1000 on both loopbacks,
# TCP, and UDP on 127.0.0.1 only (for nameservers).
LISTENERS = {
    12300: listening(12300, 1000, "127.0.0.1", "::1"),
    12301: listening(12301, 0, "127.0.0.1"),
    12302: listening(12302, 1000, "0.0.0.0", "::"),
    12303: listening(12303, 1000, "127.0.0.1"),
    12304: listening(12304, 1000, "127.0.0.1", "::1")
    + listening(12304, 1000, "127.0.0.1", protocol="udp"),
}
POLICY_PATH = "/etc/shuttle/test.policy"
FD_PATH = "/run/shuttle/test.sock.fds"
SESSION_ID = "0123456789abcdef0123456789abcdef"
LOCAL_ADDRESSES = ("198.18.0.1", "fd00:5e::1")  # what the unit tests' host has
# The UDP sockets of the unit tests' host: programs of uid 1000 on port 40000 (a wildcard
# IPv4 socket, and one at fd00:5e::1), uid 1001's on port 40001, and both uids' on 40002.
PROGRAM_PORT = 40000
UDP_SOCKETS = (
    listening(PROGRAM_PORT, 1000, "0.0.0.0", "fd00:5e::1", protocol="udp")
    + listening(40001, 1001, "198.18.0.1", "fd00:5e::1", protocol="udp")
    + listening(40002, 1000, "0.0.0.0", protocol="udp")
    + listening(40002, 1001, "198.18.0.1", protocol="udp")
)


def program_of(address: str) -> str:
    """The address of the unit tests' program that sends to address (of its IP version)."""
    return LOCAL_ADDRESSES[":" in address]


def make_target(item: str | Target) -> Targeted:
    """A firewalld target from "NET" (all ports) or (NET, first port, last port)."""
    if isinstance(item, str):
        return Targeted(ipaddress.ip_network(item))
    return Targeted(ipaddress.ip_network(item[0]), item[1], item[2])


def make_session(
    subnets: Sequence[str | Target] = ("10.0.0.0/8",),
    excludes: Sequence[str | Target] = (),
    *,
    method: str = "nft",
    port: int = 12300,
    uid: int = 1000,
    gid: int = ANY_OWNER,
    forward: bool = False,
    dns: Sequence[str] = (),
) -> Session:
    """A session as Sessions.open builds it, with the id SESSION_ID, opened by uid 1000."""
    return Session(
        id=SESSION_ID,
        caller=1000,
        method=method,
        port=port,
        subnets=tuple(map(make_target, subnets)),
        excludes=tuple(map(make_target, excludes)),
        deadline=0.0,
        uid=uid,
        gid=gid,
        forward=forward,
        dns=tuple(map(ipaddress.ip_address, dns)),
    )


def target(network: str, first: int = ALL_PORTS[0], last: int = ALL_PORTS[1]) -> Target:
    return (network, first, last)


def open_request(
    *,
    method: str = "nat",
    port: int = 12300,
    subnets: tuple[str, ...] = ("10.0.0.0/8",),
    excludes: tuple[str, ...] = (),
    uid: int = 1000,
    gid: int = ANY_OWNER,
    forward: bool = False,
    dns: tuple[str, ...] = (),
) -> OpenSessionRequest:
    """An OpenSessionRequest with networks for all ports, as a caller of uid 1000 sends it."""
    return OpenSessionRequest(
        method,
        port,
        tuple(map(target, subnets)),
        tuple(map(target, excludes)),
        uid,
        gid,
        forward,
        dns,
    )


@pytest.fixture
def method() -> FakeMethod:
    return FakeMethod()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class ReplySockets:
    """The fence of a tproxy method that makes ordinary UDP sockets where firewalld would
    make reply sockets; records each, and the flows it was told to forget."""

    def __init__(self) -> None:
        self.made: list[tuple[str, int, socket.socket]] = []
        self.forgotten: list[Flow] = []

    def reply_socket(self, session: Session, flow: Flow) -> socket.socket:
        address = flow.destination
        sock = socket.socket(
            socket.AF_INET if address.version == 4 else socket.AF_INET6, socket.SOCK_DGRAM
        )
        self.made.append((str(address), flow.port, sock))
        session.flows[flow] = None
        return sock

    def forget_flows(self, session: Session, flows: Collection[Flow]) -> None:
        for flow in flows:
            del session.flows[flow]
        self.forgotten += flows


@pytest.fixture
def sessions(method: FakeMethod, clock: FakeClock) -> Sessions:
    """Both methods are the one fake; no policy entries."""
    return Sessions(
        {"nat": method, "nft": method},
        6.0,
        policy=Policy(POLICY_PATH),
        listeners_of_port=lambda port: LISTENERS.get(port, []),
        clock=clock,
        fd_path=FD_PATH,
    )


@pytest.fixture
def tproxy() -> FakeTproxy:
    return FakeTproxy()


@pytest.fixture
def reply_sockets() -> ReplySockets:
    return ReplySockets()


@pytest.fixture
def tproxy_sessions(
    method: FakeMethod, tproxy: FakeTproxy, clock: FakeClock, reply_sockets: ReplySockets
) -> Iterator[Sessions]:
    """nat and nft are the fake method, tproxy the fake tproxy; every session is closed after."""
    sessions = Sessions(
        {"nat": method, "nft": method, "tproxy": tproxy},
        6.0,
        policy=Policy(POLICY_PATH),
        listeners_of_port=lambda port: LISTENERS.get(port, []),
        clock=clock,
        fd_path=FD_PATH,
        fence=reply_sockets,
        udp_sockets_now=lambda: UDP_SOCKETS,
    )
    try:
        yield sessions
    finally:
        sessions.close_all("test over")


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


def _saved_nat(netns: str, tool: str) -> list[str]:
    saved = subprocess.run(
        ["ip", "netns", "exec", netns, tool, "-t", "nat"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return [line for line in saved.splitlines() if not line.startswith("#")]


def nat_rules(netns: str) -> list[str]:
    """The namespace's nat table as iptables-save prints it, without comments."""
    return _saved_nat(netns, "iptables-save")


def nat6_rules(netns: str) -> list[str]:
    """The namespace's IPv6 nat table as ip6tables-save prints it, without comments."""
    return _saved_nat(netns, "ip6tables-save")


def shuttle_rules(netns: str) -> list[str]:
    """The nat method's lines, IPv4 then IPv6."""
    return [line for line in nat_rules(netns) + nat6_rules(netns) if "SHUTTLE-" in line]


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


@pytest.fixture
def start_firewalld(netns: str, socket_dir: Path) -> Iterator[Callable[..., Daemon]]:
    """Start shuttle-firewalld in the namespace and wait until it listens.

    Its policy file is socket_dir/firewalld.policy, and its hosts file socket_dir/hosts
    (never the system's /etc/hosts): each missing unless a test writes it. The lease is long
    unless a test asks for a short one (the tests of expiry do): on a loaded machine (the
    suite runs in parallel workers) a session that nothing renews must not expire between
    two steps of a test about something else.
    """
    daemons: list[Daemon] = []

    def start(
        group: str = "root",
        lease: float = LEASE,
        env: dict[str, str] | None = None,
        wrap: Sequence[str] = (),
    ) -> Daemon:
        policy = socket_dir / "firewalld.policy"
        daemon = Daemon(
            netns,
            socket_dir / "firewalld.sock",
            group,
            lease,
            policy,
            env=env,
            hosts_file=socket_dir / "hosts",
            wrap=wrap,
        )
        daemons.append(daemon)
        daemon.wait_for_line(f"shuttle-firewalld: listening on ipc://{daemon.socket_path}")
        return daemon

    try:
        yield start
    finally:
        for daemon in daemons:
            daemon.stop()


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


@pytest.fixture
def listen(netns: str) -> Iterator[Callable[..., Listener]]:
    listeners: list[Listener] = []

    def start(
        port: int,
        as_nobody: bool = False,
        addresses: tuple[str, ...] = ("127.0.0.1",),
        protocol: str = "tcp",
        v6only: bool = False,
    ) -> Listener:
        listener = Listener(netns, port, as_nobody, addresses, protocol, v6only=v6only)
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


# --- traffic in the namespace ------------------------------------------------------------

ROUTED = ("198.18.0.1/15", "fd00:5e::1/32")
ROUTED_NETWORKS = ("198.18.0.0/15", "fd00:5e::/32")


def in_netns(netns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, *argv], check=True, timeout=10)


def add_link_with(netns: str, addresses: tuple[str, str]) -> None:
    """A veth pair with both ends in netns (this kernel has no dummy interfaces), the IPv4
    and IPv6 address on one end: routed there, and nothing answers."""
    in_netns(netns, "ip", "link", "add", "fwt0", "type", "veth", "peer", "name", "fwt1")
    for link in ("fwt0", "fwt1"):
        in_netns(netns, "ip", "link", "set", link, "up")
    in_netns(netns, "ip", "addr", "add", addresses[0], "dev", "fwt0")
    in_netns(netns, "ip", "-6", "addr", "add", addresses[1], "dev", "fwt0", "nodad")


@pytest.fixture
def routed(netns: str) -> str:
    """The namespace with 198.18.0.0/15 and fd00:5e::/32 on an interface, where TCP is
    refused at once (REJECT with a reset in filter OUTPUT, which comes after nat OUTPUT): a
    connection that is not redirected is refused, a redirected one reaches the listener.
    """

    add_link_with(netns, ROUTED)
    # Matched by destination, not by -o: the hook's output device stays the one routed to
    # before nat, even when the redirect re-routes the packet to lo. --syn: not the reset
    # itself, which goes to our own address in that network.
    reject = ["-p", "tcp", "--syn", "-j", "REJECT", "--reject-with", "tcp-reset"]
    for tool, network in zip(("iptables", "ip6tables"), ROUTED_NETWORKS):
        in_netns(netns, tool, "-w", "-A", "OUTPUT", "-d", network, *reject)
    return netns


NAMESERVERS = ("10.53.0.53", "fd00:53::53")  # routed out of the namespace: nothing answers
NAMESERVER_NET = ("10.53.0.1/24", "fd00:53::1/64")
NAMESERVER_NETWORKS = ("10.53.0.0/24", "fd00:53::/64")


@pytest.fixture
def dns_net(netns: str) -> str:
    """The namespace with 10.53.0.0/24 and fd00:53::/64 on an interface, where packets that no
    session captured are stopped at once in filter OUTPUT: TCP refused (a reset), UDP
    blocked at send (EPERM). A captured packet passes: nat and nft rewrote its destination
    to loopback before (nat OUTPUT comes first), tproxy marked it (mangle comes first).
    """

    add_link_with(netns, NAMESERVER_NET)
    # Not to our own addresses there: answers and resets go to them.
    only = ["-m", "addrtype", "!", "--dst-type", "LOCAL", "-m", "mark", "--mark", "0"]
    reset = ["-j", "REJECT", "--reject-with", "tcp-reset"]
    for tool, network in zip(("iptables", "ip6tables"), NAMESERVER_NETWORKS):
        in_netns(
            netns, tool, "-w", "-A", "OUTPUT", "-d", network, "-p", "tcp", "--syn", *only, *reset
        )
        in_netns(
            netns, tool, "-w", "-A", "OUTPUT", "-d", network, "-p", "udp", *only, "-j", "REJECT"
        )
    return netns


CONNECT = """\
import json, socket, sys
results = []
for host, port in json.loads(sys.argv[1]):
    try:
        socket.create_connection((host, port), timeout=5).close()
        results.append("connected")
    except ConnectionRefusedError:
        results.append("refused")
    except OSError as exc:
        results.append(type(exc).__name__)
print(json.dumps(results))
"""


def write(path: Path, data: bytes, mode: int = 0o644) -> str:
    """A file (a policy, a hosts file) with these bytes and mode; its path."""
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


def script_argv(
    netns: str, script: str, targets: list[tuple[str, int]], as_nobody: bool
) -> list[str]:
    """The command that runs script on targets inside the namespace (as nobody, or root)."""
    user = NOBODY if as_nobody else []
    return ["ip", "netns", "exec", netns, *user, sys.executable, "-c", script, json.dumps(targets)]


def run_script(
    netns: str, script: str, targets: list[tuple[str, int]], as_nobody: bool
) -> list[str]:
    """What script_argv's command prints: one result per target."""
    done = subprocess.run(
        script_argv(netns, script, targets, as_nobody),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result: list[str] = json.loads(done.stdout)
    return result


def connect(netns: str, targets: list[tuple[str, int]], as_nobody: bool = False) -> list[str]:
    """Connect to each (host, port) from inside the namespace: connected, refused, or why not."""
    return run_script(netns, CONNECT, targets, as_nobody)


QUERY = """\
import json, socket, sys
results = []
for host, port in json.loads(sys.argv[1]):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect((host, port))  # so only an answer from (host, port) comes in
            sock.send(b"query")
            results.append(sock.recv(2048).decode())
        except PermissionError:  # a REJECT in filter OUTPUT
            results.append("blocked")
        except ConnectionRefusedError:  # an ICMP error: nobody there
            results.append("refused")
        except OSError as exc:
            results.append(type(exc).__name__)
print(json.dumps(results))
"""


def query_argv(netns: str, targets: list[tuple[str, int]], as_nobody: bool = False) -> list[str]:
    """The command that sends one UDP datagram to each (host, port) from inside the
    namespace and prints what came back: the answer, blocked, refused, or why not."""
    return script_argv(netns, QUERY, targets, as_nobody)


def query(netns: str, targets: list[tuple[str, int]], as_nobody: bool = False) -> list[str]:
    """What query_argv prints: for each target, the answer, or why there was none."""
    return run_script(netns, QUERY, targets, as_nobody)


# --- a client of another uid -------------------------------------------------------------

NOBODY_CLIENT = """\
import asyncio, json, sys
from shuttle_client.firewall_session import FirewallError, FirewallSession

async def main():
    client = FirewallSession(sys.argv[1])
    try:
        print("opened", await client.open(**json.loads(sys.argv[2])))
    except FirewallError as exc:
        print(exc)
    finally:
        await client.close()

asyncio.run(main())
"""


def as_nobody(socket_path: Path, **request: object) -> str:
    """What a FirewallSession run by uid 65534 gets for open(**request): "opened METHOD" (and
    then it closes the session at once) or the error text."""
    done = subprocess.run(
        [*NOBODY, sys.executable, "-c", NOBODY_CLIENT, str(socket_path), json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


# --- sessions of root's, from this process -------------------------------------------------


def open_session(daemon: Daemon, *args: Any, **kwargs: Any) -> tuple[FirewallSession, str]:
    """A FirewallSession opened with open(*args, **kwargs); (the session, the method applied)."""
    client = FirewallSession(str(daemon.socket_path))
    try:
        method = asyncio.run(client.open(*args, **kwargs))
    except BaseException:
        close_session(client)
        raise
    return client, method


def close_session(client: FirewallSession) -> None:
    asyncio.run(client.close())


def check_capture(netns: str, daemon: Daemon, listen: Callable[..., Listener], method: str) -> None:
    """Real connections in the routed namespace, before, during and after a session of root's
    (nat and nft alike): captured means connected (to our listener), else refused."""
    listen(12300, addresses=("127.0.0.1", "::1"))
    probes = [
        ("198.18.0.5", 80),  # in 198.18.0.0/15 ports 80-90
        ("198.18.0.5", 90),
        ("198.18.0.5", 91),  # port outside the range
        ("198.18.0.99", 80),  # excluded address
        ("198.19.0.7", 85),
        ("fd00:5e::5", 443),  # IPv6, port 443 only
        ("fd00:5e::5", 444),
        ("fd00:5e:1::5", 443),  # excluded IPv6 network
    ]
    captured = ["connected", "connected", "refused", "refused", "connected"]
    captured += ["connected", "refused", "refused"]
    assert connect(netns, probes) == ["refused"] * len(probes)
    client, applied = open_session(
        daemon,
        method,
        12300,
        [("198.18.0.0/15", 80, 90), ("fd00:5e::/32", 443, 443)],
        [("198.18.0.99/32", 1, 65535), ("fd00:5e:1::/48", 1, 65535)],
    )
    try:
        assert applied == method
        assert connect(netns, probes) == captured
        # Another uid's connections are not captured: the session is root's own.
        assert connect(netns, probes[:1], as_nobody=True) == ["refused"]
    finally:
        close_session(client)
    assert connect(netns, probes) == ["refused"] * len(probes)


def check_dns_capture(
    netns: str, daemon: Daemon, listen: Callable[..., Listener], method: str
) -> None:
    """Real DNS queries in the dns_net namespace, over UDP and TCP, before, during and after a
    session of root's with nameservers (nat and nft alike): captured means answered by our
    UDP echo (from the nameserver's address, as the querier's connected socket demands) or
    connected to our TCP listener. The session excludes the nameservers' network: port 53 of
    a nameserver is captured all the same."""
    listen(12300, addresses=("127.0.0.1", "::1"))
    args = (method, 12300, [("198.18.0.0/15", 1, 65535)], [("10.53.0.0/24", 1, 65535)])
    nameservers = ("10.53.0.53", "127.0.0.53", "fd00:53::53")
    with pytest.raises(FirewallError) as refused:  # our UDP socket is not there yet
        open_session(daemon, *args, dns=nameservers)
    assert str(refused.value) == (
        "shuttle-firewalld: no UDP socket of uid 0 on port 12300 at 127.0.0.1 or a wildcard "
        "address, where IPv4 DNS datagrams land"
    )
    listen(12300, addresses=("127.0.0.1", "::1"), protocol="udp")
    # (probe, UDP answer while captured, TCP while captured); not captured, UDP is blocked in
    # dns_net and refused at 127.0.0.53 (nobody there), TCP refused.
    expected = [
        (("10.53.0.53", 53), "echo query", "connected"),
        (("10.53.0.53", 54), "blocked", "refused"),  # another port
        (("10.53.0.54", 53), "blocked", "refused"),  # another address
        (("127.0.0.53", 53), "echo query", "connected"),  # a local stub resolver's address
        (("127.0.0.53", 54), "refused", "refused"),
        (("127.0.0.54", 53), "refused", "refused"),
        (("fd00:53::53", 53), "echo query", "connected"),
        (("fd00:53::53", 54), "blocked", "refused"),
        (("fd00:53::54", 53), "blocked", "refused"),
    ]
    probes = [probe for probe, _, _ in expected]
    uncaptured = ["refused" if host.startswith("127.") else "blocked" for host, _ in probes]
    assert query(netns, probes) == uncaptured
    assert connect(netns, probes) == ["refused"] * len(probes)
    client, applied = open_session(daemon, *args, dns=nameservers)
    try:
        assert applied == method
        assert query(netns, probes) == [answer for _, answer, _ in expected]
        assert connect(netns, probes) == [tcp for _, _, tcp in expected]
        # Another uid's queries are not captured: the session is root's own.
        assert query(netns, probes[:1], as_nobody=True) == ["blocked"]
        assert connect(netns, probes[3:4], as_nobody=True) == ["refused"]
    finally:
        close_session(client)
    assert nothing_of_shuttle(netns)
    assert query(netns, probes) == uncaptured
    assert connect(netns, probes) == ["refused"] * len(probes)


def update_session(client: FirewallSession, *args: Any) -> int:
    """client.update(*args), run to its end: the new rule count."""
    return asyncio.run(client.update(*args))


def check_update(netns: str, daemon: Daemon, listen: Callable[..., Listener], method: str) -> None:
    """Real connections in the routed namespace while a session of root's changes what it
    captures (nat and nft alike): captured means connected, else refused. Our listener is on
    127.0.0.1 only, so an update that would add IPv6 is refused, and changes nothing."""
    listen(12300)
    probes = [("198.18.0.5", 80), ("198.19.0.7", 443), ("198.19.0.99", 443)]
    client, _ = open_session(daemon, method, 12300, [("198.18.0.0/16", 80, 80)], [])
    try:
        assert connect(netns, probes) == ["connected", "refused", "refused"]
        rules = update_session(
            client, [("198.19.0.0/16", 443, 443)], [("198.19.0.99/32", 1, 65535)]
        )
        assert connect(netns, probes) == ["refused", "connected", "refused"]
        with pytest.raises(FirewallError) as refused:
            update_session(client, [("198.18.0.0/16", 80, 80), ("fd00:5e::/32", 1, 65535)], [])
        assert str(refused.value) == (
            "shuttle-firewalld: no listening socket of uid 0 on port 12300 at ::1 or a wildcard "
            "address, where IPv6 connections land"
        )
        assert connect(netns, probes) == ["refused", "connected", "refused"]
        [entry] = asyncio.run(client.list_sessions())
        assert (entry.method, entry.subnets, entry.excludes, entry.rules) == (method, 1, 1, rules)
    finally:
        close_session(client)
    assert nothing_of_shuttle(netns)
    assert connect(netns, probes) == ["refused"] * len(probes)

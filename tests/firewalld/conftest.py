"""Fixtures for firewalld's tests: fakes for the unit tests, and for the real ones a fresh
network namespace with the real shuttle-firewalld running inside it. The helpers they use
live in modules of their own (fakes, daemon, traffic, captures).

Everything a fixture starts, it stops and removes on teardown, whether the test passed or
not; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from shuttle_firewalld.policy import Policy
from shuttle_firewalld.sessions import Sessions
from shuttle_local.netns import NETNS_DIR, enter

from .daemon import LEASE, Daemon, Listener
from .fakes import (
    FD_PATH,
    LISTENERS,
    POLICY_PATH,
    UDP_SOCKETS,
    FakeClock,
    FakeMethod,
    FakeTproxy,
    ReplySockets,
)
from .traffic import (
    NAMESERVER_NET,
    NAMESERVER_NETWORKS,
    ROUTED,
    ROUTED_NETWORKS,
    add_link_with,
    in_netns,
)


@pytest.fixture
def method() -> FakeMethod:
    return FakeMethod()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


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


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace with loopback up, deleted afterwards. The test's own thread
    is in it meanwhile (and what it starts, or the threads it makes), as a real client is in
    firewalld's: firewalld puts a caller's rules in the caller's network namespace."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"shuttle-fwt-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        with inside(f"{NETNS_DIR}/{name}"):
            yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


@contextlib.contextmanager
def inside(path: str) -> Iterator[None]:
    """The calling thread in the network namespace at path for the block, then back."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        there = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            enter(there)
        finally:
            os.close(there)
        try:
            yield
        finally:
            enter(back)
    finally:
        os.close(back)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory any uid can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="shuttle-fwt-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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

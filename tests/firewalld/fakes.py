"""Stand-ins for the unit tests: fake firewall methods and clock, the unit tests' host
(its addresses, listeners, sockets), and the sessions, targets and requests they build."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection, Sequence

from hypothesis import strategies as st
from shuttle_firewalld.ports import Listener as ListeningSocket
from shuttle_firewalld.session import Session, Shortcut
from shuttle_firewalld.targets import Target as Targeted
from shuttle_firewalld.transparent import Flow
from shuttle_protocol.firewall_messages import ALL_PORTS, ANY_OWNER, OpenSessionRequest, Target


class FakeMethod:
    """A firewall method that records what it was asked to do."""

    makes_sockets = False

    def __init__(self) -> None:
        self.applied: list[Session] = []
        self.updated: list[tuple[Session, tuple[Targeted, ...], tuple[Targeted, ...]]] = []
        self.shortcuts: list[tuple[Shortcut, ...] | None] = []  # what each update was given
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
        self,
        session: Session,
        subnets: tuple[Targeted, ...],
        excludes: tuple[Targeted, ...],
        shortcuts: tuple[Shortcut, ...] | None = None,
    ) -> int:
        if self.fail_update is not None:
            raise self.fail_update
        self.updated.append((session, subnets, excludes))
        self.shortcuts.append(shortcuts)
        return len(subnets) + 1 + len(shortcuts or ())

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


# A tproxy session's request, for any uid of the unit tests' host.
TPROXY = open_request(method="tproxy", port=1, subnets=("198.18.0.0/15", "fd00:5e::/32"))

# Any value msgpack carries, nested: the fields of a hostile frame.
wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
    | st.floats()
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=20,
)


def make_shortcut(address: str, port: int, local_port: int, limit: int = 200) -> Shortcut:
    return Shortcut(ipaddress.ip_address(address), port, local_port, limit)

"""Who listens on a port, and where, from the kernel's socket table (sock_diag).

A session may redirect traffic only into a port its caller listens on, on an address the
redirected connections land on (and with nameservers, DNS datagrams too: then the caller's
UDP socket must be there as well); the uid sock_diag reports is the socket owner's, as the
kernel recorded it, and it says which IPv6 sockets are IPV6_V6ONLY.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from shuttle_protocol.firewall_messages import ANY_OWNER

from .sockdiag import dump
from .targets import Address
from .transparent import show

V4_ANY = ipaddress.IPv4Address("0.0.0.0")  # noqa: S104  (recognised, not bound)
V6_ANY = ipaddress.IPv6Address("::")
V4_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
V6_LOOPBACK = ipaddress.IPv6Address("::1")
FAMILY = {4: "IPv4", 6: "IPv6"}


@dataclass(frozen=True)
class Listener:
    """One socket that takes what is redirected to its port: a listening TCP socket, or a
    bound UDP socket (protocol "udp"); its local address and port, its owner's uid, and
    for IPv6 whether it is IPV6_V6ONLY (then it takes no IPv4, even on ::)."""

    address: Address
    port: int
    uid: int
    protocol: str = "tcp"
    v6only: bool = False


def listeners_on(port: int | None, protocol: str = "tcp") -> list[Listener]:
    """The sockets of one protocol on port, or on any port if None (TCP: listening ones;
    UDP: every one, connected or not: a connected one takes datagrams from its peer only,
    but it holds the address and port all the same), in this network namespace.
    SockDiagError if the kernel's table cannot be read."""
    return [
        Listener(item.address, item.port, item.uid, protocol, item.v6only)
        for version in (4, 6)
        for item in dump(version, protocol, port)
    ]


def sockets_on(port: int) -> list[Listener]:
    """The TCP sockets listening on port and the UDP sockets bound to it."""
    return listeners_on(port) + listeners_on(port, "udp")


def udp_sockets() -> list[Listener]:
    """Every UDP socket of this network namespace, bound or connected, with its owner."""
    return listeners_on(None, "udp")


def _takes(bound: Listener, address: Address) -> bool:
    """Whether this UDP socket may be given datagrams to address."""
    if isinstance(address, ipaddress.IPv4Address):
        return _v4_of(bound) in (address, V4_ANY)
    return bound.address in (address, V6_ANY)


def program_problem(
    sockets: Iterable[Listener], address: Address, port: int, uid: int
) -> str | None:
    """Why (address, port) is not where a program of a session capturing uid's traffic
    (ANY_OWNER: everybody's) sends from, or None if it is: a UDP socket of uid takes what is
    sent there, and no other uid's socket does (two may share a port with SO_REUSEADDR).
    A reply socket sends only there, so what it sends reaches the session's own user only.
    """
    where = show(address, port)
    reached = [
        item
        for item in sockets
        if item.protocol == "udp" and item.port == port and _takes(item, address)
    ]
    if not reached:
        return f"no UDP socket takes datagrams at {where}, where the flow's program would be"
    if uid == ANY_OWNER:
        return None
    other = _other_uid(reached, uid)
    if other is not None:
        return (
            f"the program's socket at {where} is uid {other}'s, whose traffic this "
            f"session does not capture (only uid {uid}'s)"
        )
    return None


def _other_uid(sockets: Iterable[Listener], uid: int) -> int | None:
    """The lowest uid but uid that owns one of these sockets, if any."""
    return min((item.uid for item in sockets if item.uid != uid), default=None)


def _v4_of(listener: Listener) -> ipaddress.IPv4Address | None:
    """The IPv4 address a socket bound to this address would accept connections for, if any.

    An IPv6 socket bound to :: or to an IPv4-mapped address accepts IPv4 connections too,
    unless it is IPV6_V6ONLY.
    """
    address = listener.address
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if listener.v6only:
        return None
    if address == V6_ANY:
        return V4_ANY
    return address.ipv4_mapped


def reaches(listener: Listener, version: int, forward: bool) -> bool:
    """Whether connections (or datagrams) redirected in this family could land on this
    listener.

    REDIRECT of locally generated traffic lands on 127.0.0.1 or ::1; of forwarded traffic
    (PREROUTING), on the address of the interface it came in on: any local address.
    """
    if version == 4:
        v4 = _v4_of(listener)
        return v4 is not None and (forward or v4 in (V4_ANY, V4_LOOPBACK))
    address = listener.address
    if not isinstance(address, ipaddress.IPv6Address) or address.ipv4_mapped is not None:
        return False
    return forward or address in (V6_ANY, V6_LOOPBACK)


def covers(listener: Listener, version: int, forward: bool) -> bool:
    """Whether this listener takes every connection (or datagram) redirected in this family."""
    if not forward:
        return reaches(listener, version, forward)
    if version == 4:
        return _v4_of(listener) == V4_ANY
    return listener.address == V6_ANY


def port_problem(
    listeners: Iterable[Listener],
    port: int,
    uid: int,
    versions: Collection[int],
    forward: bool,
    *,
    dns_versions: Collection[int] = (),
) -> str | None:
    """Why port is not a fit redirect target for uid's session, or None if it is.

    For each IP version captured: a listener of uid must take every redirected connection,
    and no other uid may listen where redirected connections could land (the kernel allows
    that beside an IPv6 socket with IPV6_V6ONLY, for example). dns_versions: the versions of
    the session's nameservers, whose DNS datagrams are redirected to the same port: the same
    for UDP sockets there.
    """
    listeners = list(listeners)
    return _problem(listeners, "tcp", port, uid, versions, forward=forward) or _problem(
        listeners, "udp", port, uid, dns_versions, forward=forward
    )


# How a refusal names the sockets and what is redirected to them, per protocol.
_SOCKETS = {"tcp": "listening socket", "udp": "UDP socket"}
_OTHERS = {"tcp": "listeners", "udp": "UDP sockets"}
_TRAFFIC = {"tcp": "connections", "udp": "DNS datagrams"}


def _problem(
    listeners: list[Listener],
    protocol: str,
    port: int,
    uid: int,
    versions: Collection[int],
    *,
    forward: bool,
) -> str | None:
    """port_problem for the sockets of one protocol."""
    for version in sorted(versions):
        reached = [
            listener
            for listener in listeners
            if listener.protocol == protocol and reaches(listener, version, forward)
        ]
        traffic = f"{FAMILY[version]} {_TRAFFIC[protocol]}"
        if not any(
            listener.uid == uid and covers(listener, version, forward) for listener in reached
        ):
            if forward:
                where = f"a wildcard address, where forwarded {traffic} land"
            else:
                loopback = V4_LOOPBACK if version == 4 else V6_LOOPBACK
                where = f"{loopback} or a wildcard address, where {traffic} land"
            return f"no {_SOCKETS[protocol]} of uid {uid} on port {port} at {where}"
        other = _other_uid(reached, uid)
        if other is not None:
            return (
                f"port {port} has {_OTHERS[protocol]} of other users too (uid {other}) "
                f"where {traffic} would land"
            )
    return None

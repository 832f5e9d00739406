"""Who listens on a TCP port, and where, from the kernel's socket tables /proc/net/tcp{,6}.

A session may redirect traffic only into a port its caller listens on, on an address the
redirected connections land on; the uid column of these tables is the socket owner's, as the
kernel recorded it.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass

from .targets import Address

PROC_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
TCP_LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN = 10

V4_ANY = ipaddress.IPv4Address("0.0.0.0")  # noqa: S104  (recognised, not bound)
V6_ANY = ipaddress.IPv6Address("::")
V4_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
V6_LOOPBACK = ipaddress.IPv6Address("::1")
FAMILY = {4: "IPv4", 6: "IPv6"}


@dataclass(frozen=True)
class Listener:
    """One listening TCP socket: its local address and port, and its owner's uid."""

    address: Address
    port: int
    uid: int


def parse_address(text: str) -> Address:
    """A local_address column's address: 8 or 32 hex digits.

    The kernel prints each 32-bit word of the (network order) address as a host-order
    integer, so on a little-endian host 127.0.0.1 reads "0100007F": undo that per word.
    """
    if len(text) not in (8, 32):
        raise ValueError(f"address of {len(text)} hex digits")
    raw = b"".join(
        int(text[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(text), 8)
    )
    return ipaddress.ip_address(raw)


def parse_listeners(text: str) -> Iterator[Listener]:
    """Each listening socket in one table; other lines, and lines that do not parse, skipped."""
    for line in text.splitlines()[1:]:  # the first line is the column header
        fields = line.split()
        # sl local_address rem_address st tx:rx tr:tm retrnsmt uid timeout inode ...
        if len(fields) < 10 or fields[3] != TCP_LISTEN:
            continue
        address_hex, _, port_hex = fields[1].rpartition(":")
        try:
            yield Listener(parse_address(address_hex), int(port_hex, 16), int(fields[7]))
        except ValueError:
            continue


def listeners_on(port: int, tables: Iterable[str] = PROC_TABLES) -> list[Listener]:
    """The TCP sockets listening on port, in this network namespace."""
    found: list[Listener] = []
    for path in tables:
        try:
            with open(path, encoding="ascii") as table:
                text = table.read()
        except FileNotFoundError:  # no tcp6 table when IPv6 is disabled
            continue
        found.extend(listener for listener in parse_listeners(text) if listener.port == port)
    return found


def _v4_of(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a socket bound to this address would accept connections for, if any.

    An IPv6 socket bound to :: (unless IPV6_V6ONLY, which /proc does not show) or to an
    IPv4-mapped address accepts IPv4 connections too.
    """
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address == V6_ANY:
        return V4_ANY
    return address.ipv4_mapped


def reaches(listener: Listener, version: int, forward: bool) -> bool:
    """Whether connections redirected in this family could land on this listener.

    REDIRECT of locally generated traffic lands on 127.0.0.1 or ::1; of forwarded traffic
    (PREROUTING), on the address of the interface it came in on: any local address.
    """
    if version == 4:
        v4 = _v4_of(listener.address)
        return v4 is not None and (forward or v4 in (V4_ANY, V4_LOOPBACK))
    address = listener.address
    if not isinstance(address, ipaddress.IPv6Address) or address.ipv4_mapped is not None:
        return False
    return forward or address in (V6_ANY, V6_LOOPBACK)


def covers(listener: Listener, version: int, forward: bool) -> bool:
    """Whether this listener takes every connection redirected in this family."""
    if not forward:
        return reaches(listener, version, forward)
    if version == 4:
        return _v4_of(listener.address) == V4_ANY
    return listener.address == V6_ANY


def port_problem(
    listeners: Iterable[Listener], port: int, uid: int, versions: Collection[int], forward: bool
) -> str | None:
    """Why port is not a fit redirect target for uid's session, or None if it is.

    For each IP version captured: a listener of uid must take every redirected connection,
    and no other uid may listen where redirected connections could land (the kernel allows
    that beside an IPv6 socket with IPV6_V6ONLY, for example).
    """
    listeners = list(listeners)
    for version in sorted(versions):
        reached = [listener for listener in listeners if reaches(listener, version, forward)]
        if not any(
            listener.uid == uid and covers(listener, version, forward) for listener in reached
        ):
            if forward:
                where = f"a wildcard address, where forwarded {FAMILY[version]} connections land"
            else:
                loopback = V4_LOOPBACK if version == 4 else V6_LOOPBACK
                where = (
                    f"{loopback} or a wildcard address, where {FAMILY[version]} connections land"
                )
            return f"no listening socket of uid {uid} on port {port} at {where}"
        others = sorted({listener.uid for listener in reached if listener.uid != uid})
        if others:
            return (
                f"port {port} has listeners of other users too (uid {others[0]}) "
                f"where {FAMILY[version]} connections would land"
            )
    return None

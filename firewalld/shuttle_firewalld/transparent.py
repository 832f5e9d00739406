"""Transparent sockets for the tproxy method, and the checks on where a reply socket may sit.

TPROXY hands a packet to a socket without rewriting its destination, so the socket has to
accept (TCP) or receive (UDP) for addresses that are not this host's, and a UDP answer has
to leave from such an address. The kernel allows that only to sockets with IP_TRANSPARENT
(IPV6_TRANSPARENT), which needs CAP_NET_ADMIN; nft's tproxy even skips a socket without it.
So firewalld makes these sockets and hands them to the client, which never runs as root.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Collection, Iterable

from .errors import RequestError
from .targets import DNS_PORT, LOOPBACK, Address, Target

# <linux/in.h> and <linux/in6.h>; Python's socket module does not name them.
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
IPV6_TRANSPARENT = 75

FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
LEVEL = {4: socket.IPPROTO_IP, 6: socket.IPPROTO_IPV6}
TRANSPARENT = {4: IP_TRANSPARENT, 6: IPV6_TRANSPARENT}
RECV_ORIGINAL_DESTINATION = {4: IP_RECVORIGDSTADDR, 6: IPV6_RECVORIGDSTADDR}
# Where the tproxy rules divert packets to: loopback, so that nobody outside this host can
# reach the listeners directly.
LISTEN_ADDRESS = {4: "127.0.0.1", 6: "::1"}
PORT_ATTEMPTS = 20  # a picked port may be taken for the other protocol; try another
BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


def transparent_socket(version: int, kind: str, reuse: bool) -> socket.socket:
    """An unbound transparent socket. kind: "tcp"; "udp", which also gets the original
    destination of each datagram (IP_RECVORIGDSTADDR); or "reply", UDP that only sends.
    OSError if that fails."""
    sock = socket.socket(
        FAMILY[version], socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    )
    try:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if version == 6:
            # Else an IPv6 socket takes IPv4 too, as IPv4-mapped addresses: the IPv4 socket
            # is a socket of its own, with its own kind of ancillary data.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(LEVEL[version], TRANSPARENT[version], 1)
        if kind == "udp":
            sock.setsockopt(LEVEL[version], RECV_ORIGINAL_DESTINATION[version], 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _listener(version: int, kind: str, port: int) -> socket.socket:
    # SO_REUSEADDR only for TCP, where it lets a restarted listener bind beside old
    # connections in TIME_WAIT and still conflicts with any other listener. On a UDP socket
    # it would let any local user bind the same address and port with SO_REUSEADDR (tried
    # here); nft's tproxy may then find that non-transparent socket first, skip it, and
    # deliver the session's datagrams nowhere.
    sock = transparent_socket(version, kind, reuse=kind == "tcp")
    try:
        sock.bind((LISTEN_ADDRESS[version], port))
        if kind == "tcp":
            sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def listeners(versions: Collection[int]) -> tuple[int, dict[str, socket.socket]]:
    """A TCP listener and a UDP socket per IP version, transparent, all on one free port on
    loopback: (the port, {"tcp4": ..., "udp4": ..., "tcp6": ..., "udp6": ...})."""
    for _ in range(PORT_ATTEMPTS):
        made: dict[str, socket.socket] = {}
        port = 0  # the first bind picks a free port, the others take the same
        try:
            for version in sorted(versions):
                for kind in ("tcp", "udp"):
                    sock = _listener(version, kind, port)
                    made[f"{kind}{version}"] = sock
                    port = sock.getsockname()[1]
            return port, made
        except OSError as exc:
            for sock in made.values():
                sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise RequestError(f"cannot make the transparent sockets: {exc.strerror}") from None
    raise RequestError(f"found no port free for TCP and UDP in {PORT_ATTEMPTS} tries")


def reply_socket(address: Address, port: int) -> socket.socket:
    """A transparent UDP socket bound to (address, port), for answers from there.

    SO_REUSEADDR: two sessions, or two flows, may answer from the same original destination.
    The address is not local (reply_problem saw to it), so no ordinary socket can share it.
    """
    try:
        sock = transparent_socket(address.version, "reply", reuse=True)
    except OSError as exc:
        raise RequestError(f"cannot make a reply socket: {exc.strerror}") from None
    try:
        sock.bind((str(address), port))
    except OSError as exc:
        sock.close()
        where = show(address, port)
        raise RequestError(f"cannot bind a reply socket to {where}: {exc.strerror}") from None
    return sock


def is_local(address: Address) -> bool:
    """Whether address is this host's own, as its routing says (the local table).

    Connecting a UDP socket sends nothing; it only looks up the route, whose source for a
    local destination is that address itself. Unlike a test bind(), this does not depend on
    net.ipv4.ip_nonlocal_bind. Our socket has no mark, so no tproxy route comes into it.
    """
    with socket.socket(FAMILY[address.version], socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((str(address), 9))
        except OSError:  # no route at all: certainly not local
            return False
        return bool(probe.getsockname()[0] == str(address))


def show(address: Address, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _covers(targets: Iterable[Target], address: Address, port: int) -> bool:
    return any(
        address in target.network and target.first_port <= port <= target.last_port
        for target in targets
    )


def reply_problem(
    subnets: Iterable[Target],
    excludes: Iterable[Target],
    address: Address,
    port: int,
    local: Callable[[Address], bool] = is_local,
    *,
    dns: Collection[Address] = (),
) -> str | None:
    """Why a session capturing subnets minus excludes, and port 53 of its nameservers (dns),
    may not have a reply socket at (address, port), or None if it may: it must be a
    destination the session captures.

    A reply socket sends from an address that is not this host's; limiting it to what the
    session captures keeps the client from speaking for anyone else. Addresses the rules
    never capture are refused too: loopback, this host's own addresses (a reply socket
    there, with SO_REUSEADDR, could take datagrams from a local service), and addresses
    that are no unicast destination at all.
    """
    where = show(address, port)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"{where} is an IPv4-mapped address; ask for {address.ipv4_mapped} instead"
    if (
        address in LOOPBACK[address.version]
        or address.is_unspecified
        or address.is_multicast
        or address == ipaddress.IPv4Address("255.255.255.255")
    ):
        return f"{where} is not an address this session captures"
    nameserver = port == DNS_PORT and address in dns  # captured whatever the excludes say
    if not nameserver and (not _covers(subnets, address, port) or _covers(excludes, address, port)):
        return f"{where} is not inside the session's subnets (or is excluded)"
    if local(address):
        return f"{where} is this host's own address, which is never captured"
    return None

"""Transparent sockets for the tproxy method, the checks on where a reply socket may sit and
whom it answers, and the fences that keep it to that one flow.

TPROXY hands a packet to a socket without rewriting its destination, so the socket has to
accept (TCP) or receive (UDP) for addresses that are not this host's, and a UDP answer has
to leave from such an address. The kernel allows that only to sockets with IP_TRANSPARENT
(IPV6_TRANSPARENT), which needs CAP_NET_ADMIN; nft's tproxy even skips a socket without it.
So firewalld makes these sockets and hands them to the client, which never runs as root.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import socket
import struct
from collections.abc import Collection, Iterable
from typing import Any, NamedTuple, Union

from .errors import RequestError
from .prepared import Targets, covers
from .targets import DNS_PORT, LOOPBACK, Address

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


class Flow(NamedTuple):
    """One captured flow that a reply socket answers: datagrams from the program at
    (program, program_port) to the original destination (destination, port)."""

    program: Address
    program_port: int
    destination: Address
    port: int


# A classic BPF program of one instruction, `ret #0`: keep no byte of any datagram.
_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)  # BPF_RET | BPF_K, k = 0
SO_ATTACH_FILTER = 26  # <asm-generic/socket.h>; the socket module does not name them
SO_LOCK_FILTER = 44


def reply_socket(flow: Flow, mark: int, device: str) -> socket.socket:
    """A transparent UDP socket bound to the flow's original destination, for answers from
    there, and fenced so that it can do nothing else (docs/firewalld.md, "Reply sockets"):

    - SO_MARK mark: nft lets a packet with this mark leave only towards a program of one
      of the session's flows, from exactly that flow's destination (tproxy.py). Changing
      the mark needs CAP_NET_ADMIN, which the client has not.
    - SO_BINDTODEVICE to the device of the program's address: the kernel matches the socket
      only to datagrams that arrive on that device, never to the captured ones that loop back
      on lo, so connect() cannot make it win another user's flow from the tproxy listener
      (tried here: without it, a reply socket connected to a victim's source took the
      victim's datagrams). Unbinding needs CAP_NET_RAW.
    - A filter that drops every datagram, locked (SO_LOCK_FILTER, which cannot be undone):
      whatever reaches the socket, its owner reads nothing.

    SO_REUSEADDR: two sessions, or two flows, may answer from the same original destination.
    The address is not local (the route check saw to it), so no ordinary socket can share it.
    """
    address, port = flow.destination, flow.port
    try:
        sock = transparent_socket(address.version, "reply", reuse=True)
    except OSError as exc:
        raise RequestError(f"cannot make a reply socket: {exc.strerror}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        program = ctypes.create_string_buffer(_DROP_ALL)
        # struct sock_fprog: the instruction count, then a pointer to the instructions.
        fprog = struct.pack("HL", 1, ctypes.addressof(program))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        sock.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)
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


def reply_problem(
    subnets: Targets,
    excludes: Targets,
    address: Address,
    port: int,
    *,
    dns: Collection[Address] = (),
) -> str | None:
    """Why a session capturing subnets minus excludes, and port 53 of its nameservers (dns),
    may not have a reply socket at (address, port), or None if it may: it must be a
    destination the session captures.

    A reply socket sends from an address that is not this host's; limiting it to what the
    session captures keeps the client from speaking for anyone else. Addresses the rules
    never capture are refused too: loopback, and addresses that are no unicast destination
    at all (destination_problem asks the routing about the rest).
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
    if not nameserver and (not covers(subnets, address, port) or covers(excludes, address, port)):
        return f"{where} is not inside the session's subnets (or is excluded)"
    return None


# A route in `ip -j route get` that names no type is a plain unicast one.
UNICAST = "unicast"
# The device and the address (with its prefix) of each of this host's addresses.
Interface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]
HostAddress = tuple[str, Interface]


def route_type(listing: str) -> str:
    """The type of the route in `ip -j route get` output: "unicast", "local", "broadcast",
    "multicast", "anycast", ... ValueError if it is no such output."""
    routes = json.loads(listing)
    if type(routes) is not list or len(routes) != 1 or type(routes[0]) is not dict:
        raise ValueError("not one route")
    kind = routes[0].get("type", UNICAST)
    if type(kind) is not str:
        raise ValueError("a route type that is no text")
    return kind


def host_addresses(listing: str) -> list[HostAddress]:
    """From `ip -j addr show`: (device, address/prefix) for each of this host's addresses;
    entries that are not such, skipped. ValueError if it is no JSON list."""
    links = json.loads(listing) if listing.strip() else []
    if type(links) is not list:
        raise ValueError("not a JSON list")
    found: list[HostAddress] = []
    for link in links:
        if type(link) is not dict or type(link.get("ifname")) is not str:
            continue
        for item in link.get("addr_info") or ():
            try:
                found.append((link["ifname"], _interface(item)))
            except (TypeError, ValueError):
                continue
    return found


def _interface(item: Any) -> Interface:
    if type(item) is not dict or type(item.get("prefixlen")) is not int:
        raise ValueError("no address")
    return ipaddress.ip_interface(f"{item['local']}/{item['prefixlen']}")


def destination_problem(flow: Flow, kind: str, found: Iterable[HostAddress]) -> str | None:
    """Why no reply may come from the flow's destination, whose route is of this kind, on a
    host with these addresses; None if one may. Only a unicast destination that is not this
    host's: a reply from a broadcast or network address would speak for a whole subnet, and
    the routing says which they are (a network address of an on-link subnet routes as
    unicast on Linux 5.x and later, so the host's own prefixes say that one)."""
    address = flow.destination
    where = show(address, flow.port)
    if kind == "local":
        return f"{where} is this host's own address, which is never captured"
    if kind != UNICAST:
        return f"{where} is a {kind} address, not one a reply may come from"
    for _, interface in found:
        network = interface.network
        if network.version != address.version or network.prefixlen >= network.max_prefixlen - 1:
            continue  # /31 and /32 (/127, /128) have no network or broadcast address
        if address == network.network_address:
            return f"{where} is the network address of {network}, a subnet of this host"
        if isinstance(network, ipaddress.IPv4Network) and address == network.broadcast_address:
            return f"{where} is the broadcast address of {network}, a subnet of this host"
    return None


def program_device(flow: Flow, found: Iterable[HostAddress]) -> str:
    """The device of the flow's program address, which must be one of this host's (found);
    RequestError if it is not, or lies on loopback (whose captured datagrams to elsewhere
    the kernel refuses to send anyway)."""
    where = show(flow.program, flow.program_port)
    device = next((name for name, item in found if item.ip == flow.program), None)
    if device is None:
        raise RequestError(f"the program at {where} has no address of this host")
    if device == "lo":
        raise RequestError(f"the program at {where} is on loopback, whence no flow is captured")
    return device

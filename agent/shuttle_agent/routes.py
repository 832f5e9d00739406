"""The agent's answer to GetRoutes: the networks of the server's routing tables, read from
/proc/net/route (IPv4) and /proc/net/ipv6_route (IPv6), without running `ip` or `netstat`.

Which tables: /proc/net/route shows the main IPv4 table only (the kernel skips the local
table and policy-routing tables there; only netlink would show them), while
/proc/net/ipv6_route shows every IPv6 table, the local one included (::1/128, the server's
own addresses, ff00::/8). Routes are reported as the kernel has them, default, loopback,
link-local and multicast included: the client decides what to capture. Routes that
deliver nothing (unreachable, prohibit, blackhole, throw, and the kernel's null entry ::/0
on lo) are left out: they say that a network is not routed.
"""

import ipaddress
import logging
import re
import sys
from typing import Callable, Dict, Iterable, Iterator, List, Literal, Optional, Sequence, Tuple

from shuttle_protocol.stream_messages import MAX_LIST, MAX_ROUTES, Routes

log = logging.getLogger("shuttle")

ROUTE_FILE = "/proc/net/route"
IPV6_ROUTE_FILE = "/proc/net/ipv6_route"

# Route flags, from linux/route.h (the same values in both files).
RTF_UP = 0x0001
RTF_GATEWAY = 0x0002
RTF_REJECT = 0x0200

_HEX8 = re.compile(r"[0-9A-Fa-f]{8}")
_HEX32 = re.compile(r"[0-9A-Fa-f]{32}")
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")
_HEX = re.compile(r"[0-9A-Fa-f]{1,8}")

ByteOrder = Literal["little", "big"]


def _routes_something(flags_text: str, direct: bool = False) -> bool:
    """Whether a route with these flags (hex) takes packets somewhere; direct: somewhere on
    a link of this host's, without a gateway."""
    if not _HEX.fullmatch(flags_text):
        return False
    flags = int(flags_text, 16)
    if direct and flags & RTF_GATEWAY:
        return False
    return bool(flags & RTF_UP) and not flags & RTF_REJECT


def _ipv4_prefix(mask: int) -> Optional[int]:
    """The prefix length of a netmask, or None if its ones are not contiguous."""
    length = bin(mask).count("1")
    if mask != (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF:
        return None
    return length


def parse_ipv4_routes(
    lines: Iterable[str], byteorder: ByteOrder = sys.byteorder, direct: bool = False
) -> Iterator[str]:
    """The networks of /proc/net/route, in its order; the header and malformed lines skipped;
    direct: only those of routes without a gateway (the networks of this host's links).

    Columns: Iface Destination Gateway Flags RefCnt Use Metric Mask MTU Window IRTT. The
    kernel prints each address's network-order bytes as one native integer in hex, so on
    little-endian machines (x86, ARM) "000200C0" is 192.0.2.0: byteorder says which.
    """
    for line in lines:
        fields = line.split()
        if len(fields) < 8 or not (_HEX8.fullmatch(fields[1]) and _HEX8.fullmatch(fields[7])):
            continue
        # An IPv4 route without a device ("*") delivers nothing: blackhole and throw routes
        # have neither a device nor RTF_REJECT here (IPv6 marks them with RTF_REJECT).
        if fields[0] == "*" or not _routes_something(fields[3], direct):
            continue
        destination = int.from_bytes(bytes.fromhex(fields[1]), byteorder)
        prefix = _ipv4_prefix(int.from_bytes(bytes.fromhex(fields[7]), byteorder))
        if prefix is None:
            continue
        try:
            network = ipaddress.IPv4Network((destination, prefix))
        except ValueError:  # host bits set: not a network the kernel would hold
            continue
        yield str(network)


def parse_ipv6_routes(lines: Iterable[str], direct: bool = False) -> Iterator[str]:
    """The destination networks of /proc/net/ipv6_route, in its order; malformed lines
    skipped; direct: as for parse_ipv4_routes.

    Columns (no header): destination, its prefix length, source, its prefix length, next
    hop, metric, reference count, use count, flags, device. Addresses are 32 hex digits in
    network order, prefix lengths 2 hex digits. A route with a source prefix ("from") still
    routes its destination, which is what is reported.
    """
    for line in lines:
        fields = line.split()
        if len(fields) != 10 or not _HEX32.fullmatch(fields[0]):
            continue
        if not _HEX2.fullmatch(fields[1]) or not _routes_something(fields[8], direct):
            continue
        try:
            network = ipaddress.IPv6Network((int(fields[0], 16), int(fields[1], 16)))
        except ValueError:  # a prefix length over 128, or host bits set
            continue
        # IPv4-mapped addresses never travel as IPv6 packets, and Python 3.13 writes them
        # differently (::ffff:0.0.0.0/96, not ::ffff:0:0/96): a client on another Python
        # version would find the text not canonical and end the session.
        if network.network_address.ipv4_mapped is not None:
            continue
        yield str(network)


def read_routes(
    route_file: str = ROUTE_FILE,
    ipv6_route_file: str = IPV6_ROUTE_FILE,
    limit: int = MAX_ROUTES,
    direct: bool = False,
) -> List[str]:
    """The server's routed networks, IPv4 then IPv6, each once, at most limit of them;
    direct: only those reached without a gateway (the client asks this of its own host).

    A file that cannot be read (not Linux, or IPv6 disabled) is logged and contributes none.
    The files are read line by line and no further than needed, however big the table.
    """
    found: Dict[str, None] = {}
    sources: Sequence[Tuple[str, Callable[[Iterable[str]], Iterator[str]]]] = (
        (route_file, lambda lines: parse_ipv4_routes(lines, direct=direct)),
        (ipv6_route_file, lambda lines: parse_ipv6_routes(lines, direct)),
    )
    for path, parse in sources:
        try:
            # Device names may be any bytes but a slash and whitespace; they are not used.
            with open(path, encoding="utf-8", errors="replace") as lines:
                for network in parse(lines):
                    if len(found) >= limit:
                        log.warning("more than %d routes: the rest are not reported", limit)
                        return list(found)
                    found[network] = None
        except OSError as exc:
            log.info("cannot read the routes in %s: %s", path, exc.strerror or exc)
    return list(found)


def routes_answer(networks: Sequence[str]) -> List[Routes]:
    """The Routes messages that carry networks: MAX_LIST each, `more` on all but the last."""
    chunks = [tuple(networks[i : i + MAX_LIST]) for i in range(0, len(networks), MAX_LIST)]
    if not chunks:
        return [Routes((), False)]
    return [Routes(chunk, i < len(chunks) - 1) for i, chunk in enumerate(chunks)]

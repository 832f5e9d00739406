"""Captured and excluded destinations (a network and a port range each), and their flattening
into non-overlapping boxes for nft's interval sets.

The kernel's set type for concatenated intervals (nft_set_pipapo) refuses an element that
overlaps one already in the set ("File exists"), even when one contains the other, so
`disjoint` rewrites any list of targets into boxes that do not overlap and cover exactly the
same (address, port) pairs. The nat method uses targets as they are: its rules are tried in
order, so overlaps do no harm there.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

from shuttle_protocol.firewall_messages import ALL_PORTS

from .errors import RequestError

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# The most port ranges `disjoint` may look at, summed over the address segments: enough for
# 50,000 targets that overlap now and then, and a bound on what a caller can make root do.
MAX_WORK = 1_000_000

LOOPBACK = {4: ipaddress.ip_network("127.0.0.0/8"), 6: ipaddress.ip_network("::1/128")}
# A session's nameservers (OpenSessionRequest.dns) are captured on this port, TCP and UDP.
DNS_PORT = 53


@dataclass(frozen=True)
class Target:
    """TCP to one network, ports first_port..last_port (ALL_PORTS: no port match)."""

    network: Network
    first_port: int = ALL_PORTS[0]
    last_port: int = ALL_PORTS[1]

    @classmethod
    def from_wire(cls, item: tuple[str, int, int]) -> Target:
        """From a validated OpenSessionRequest item (the protocol checked its form)."""
        return cls(ipaddress.ip_network(item[0]), item[1], item[2])

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def all_ports(self) -> bool:
        return (self.first_port, self.last_port) == ALL_PORTS

    def __str__(self) -> str:
        if self.all_ports:
            return str(self.network)
        return f"{self.network} port {self.first_port}-{self.last_port}"


@dataclass(frozen=True)
class Box:
    """Addresses first..last (as integers) times ports first_port..last_port, inclusive."""

    version: int
    first: int
    last: int
    first_port: int
    last_port: int

    def address_text(self) -> str:
        """As nft writes it: an address, a prefix when the range is one, else a range."""
        make = ipaddress.IPv4Address if self.version == 4 else ipaddress.IPv6Address
        bits = 32 if self.version == 4 else 128
        size = self.last - self.first + 1
        if size & (size - 1) == 0 and self.first % size == 0:  # a power of two, aligned
            prefix = bits - (size.bit_length() - 1)
            return str(make(self.first)) if prefix == bits else f"{make(self.first)}/{prefix}"
        return f"{make(self.first)}-{make(self.last)}"

    def port_text(self) -> str:
        if self.first_port == self.last_port:
            return str(self.first_port)
        return f"{self.first_port}-{self.last_port}"


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted port ranges, overlapping or adjacent ones joined."""
    merged: list[tuple[int, int]] = []
    for first, last in ranges:
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return tuple(merged)


def disjoint(targets: Iterable[Target], version: int) -> list[Box]:
    """Boxes that cover exactly what the targets of this IP version cover, none overlapping.

    A sweep along the address axis: between two consecutive target boundaries the set of
    targets in force is constant, so that address segment gets the union of their port
    ranges. Neighbouring segments with the same ports are joined. RequestError if the
    targets overlap in so many ways that the work would exceed MAX_WORK.
    """
    # At each boundary address, the port ranges that start (+1) or end (-1) there.
    changes: defaultdict[int, list[tuple[int, tuple[int, int]]]] = defaultdict(list)
    for target in targets:
        if target.version != version:
            continue
        ports = (target.first_port, target.last_port)
        first = int(target.network.network_address)
        changes[first].append((1, ports))
        # Not broadcast_address: it would stay cached in each network, megabytes of
        # addresses for as long as the session lives (docs/firewalld.md, "Limits").
        size = 1 << (target.network.max_prefixlen - target.network.prefixlen)
        changes[first + size].append((-1, ports))
    points = sorted(changes)
    active: Counter[tuple[int, int]] = Counter()
    # Address segments: [first, last, port ranges], neighbours with equal ports joined.
    segments: list[tuple[int, int, tuple[tuple[int, int], ...]]] = []
    work = 0
    for index, point in enumerate(points):
        for delta, ports in changes[point]:
            active[ports] += delta
            if active[ports] == 0:
                del active[ports]
        if not active:
            continue  # a gap; after the last point nothing is active, so index + 1 exists
        work += len(active)
        if work > MAX_WORK:
            raise RequestError(
                "the subnets overlap in too many ways with different port ranges; "
                "merge them or give fewer port ranges"
            )
        ports_here = _merge(sorted(active))
        last = points[index + 1] - 1
        if segments and segments[-1][1] + 1 == point and segments[-1][2] == ports_here:
            segments[-1] = (segments[-1][0], last, ports_here)
        else:
            segments.append((point, last, ports_here))
    return [
        Box(version, first, last, first_port, last_port)
        for first, last, ports_here in segments
        for first_port, last_port in ports_here
    ]

"""A session's subnets or excludes in either of the two forms firewalld holds them: a tuple of
Targets (a request of up to server.QUICK_FRAME bytes, checked here), or Prepared (a bigger
one, checked and turned into rule text by a child process, offload.py, off the daemon's
interpreter). The methods, the reply-socket checks and Sessions ask this module, never the
form itself, for what they need: the IP versions, nft's set elements, nat's matches, whether
an (address, port) is covered.

Prepared is compact: the rule text as a few long strings and the boxes as packed bytes, where
100,000 Target objects cost about 45 MiB, and held by the parent without one Python object
per target (building and freeing those held the daemon's GIL for seconds).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Union

from .targets import Address, Box, Target, disjoint

ADDRESS_BYTES = {4: 4, 6: 16}
PORT_BYTES = 2


def record_size(version: int) -> int:
    """The bytes of one packed box: first and last address, first and last port."""
    return 2 * ADDRESS_BYTES[version] + 2 * PORT_BYTES


@dataclass(frozen=True, eq=False)
class Prepared:
    """Subnets or excludes as the child made them for one method (see offload.py)."""

    method: str  # the method whose text it holds
    count: int  # how many targets the request gave
    versions: frozenset[int]  # of those targets
    # nft and tproxy: per IP version, the set's element lines (element_lines of disjoint).
    elements: Mapping[int, str]
    # nat: per IP version, each target's match (target_match), one per line.
    matches: Mapping[int, str]
    # Per IP version, disjoint's boxes packed (pack), for covers() (nat: none if disjoint
    # refused its targets).
    boxes: Mapping[int, bytes]

    def __len__(self) -> int:
        return self.count


Targets = Union[tuple[Target, ...], Prepared]


def versions_of(targets: Targets) -> set[int]:
    """The IP versions of these targets."""
    if isinstance(targets, Prepared):
        return set(targets.versions)
    return {target.version for target in targets}


def element_lines(boxes: Iterable[Box]) -> str:
    """nft's elements of an interval set of address . port, one per line ("" for none)."""
    return ",\n".join(f"\t\t\t{box.address_text()} . {box.port_text()}" for box in boxes)


def nft_elements(targets: Targets, version: int) -> str:
    """element_lines of the targets of this IP version, made disjoint."""
    if isinstance(targets, Prepared):
        return _part(targets, targets.elements, version)
    return element_lines(disjoint(targets, version))


def target_match(target: Target, protocol: bool = False) -> str:
    """iptables' match of a target: `-d NET`, plus the port match unless the target takes
    every port; protocol: name the protocol even then (REDIRECT --to-ports needs it)."""
    if target.all_ports:
        return f"-d {target.network}" + (" -p tcp" if protocol else "")
    ports = str(target.first_port)
    if target.last_port != target.first_port:
        ports += f":{target.last_port}"
    return f"-d {target.network} -p tcp -m tcp --dport {ports}"


def nat_matches(targets: Targets, version: int, protocol: bool = False) -> list[str]:
    """target_match of each target of this IP version, in order; protocol as there (a
    Prepared was made with the protocol its list needs: subnets with, excludes without)."""
    if isinstance(targets, Prepared):
        text = _part(targets, targets.matches, version)
        return text.split("\n") if text else []
    return [target_match(target, protocol) for target in targets if target.version == version]


def _part(prepared: Prepared, parts: Mapping[int, str], version: int) -> str:
    if version not in prepared.versions:
        return ""
    if version not in parts:  # our bug: the child was asked for another method's text
        raise ValueError(f"targets prepared for {prepared.method} hold no such text")
    return parts[version]


def pack(boxes: Iterable[Box], version: int) -> bytes:
    """Boxes (sorted by address, as disjoint makes them) as fixed-size big-endian records."""
    size = ADDRESS_BYTES[version]
    return b"".join(
        box.first.to_bytes(size, "big")
        + box.last.to_bytes(size, "big")
        + box.first_port.to_bytes(PORT_BYTES, "big")
        + box.last_port.to_bytes(PORT_BYTES, "big")
        for box in boxes
    )


def covers(targets: Targets, address: Address, port: int) -> bool:
    """Whether one of the targets takes (address, port)."""
    if not isinstance(targets, Prepared):
        return any(
            address in target.network and target.first_port <= port <= target.last_port
            for target in targets
        )
    version = address.version
    if version not in targets.versions:
        return False
    if version not in targets.boxes:  # our bug, as in _part
        raise ValueError(f"targets prepared for {targets.method} hold no boxes")
    records = _Records(targets.boxes[version], version)
    wanted = int(address)
    # The boxes of one address segment share first and last, one box per port range; the
    # segments do not overlap: so only the boxes starting where the last one before
    # `wanted` starts can hold it.
    index = bisect.bisect_right(records, wanted, key=lambda record: record[0]) - 1
    if index < 0:
        return False
    start = records[index][0]
    while index >= 0:
        first, last, first_port, last_port = records[index]
        if first != start or last < wanted:
            return False
        if first_port <= port <= last_port:
            return True
        index -= 1
    return False


class _Records:
    """The packed boxes as a sequence of (first, last, first_port, last_port), for bisect."""

    def __init__(self, data: bytes, version: int) -> None:
        self._data = memoryview(data)
        self._address = ADDRESS_BYTES[version]
        self._size = record_size(version)

    def __len__(self) -> int:
        return len(self._data) // self._size

    def __getitem__(self, index: int) -> tuple[int, int, int, int]:
        at, step = index * self._size, self._address
        data = self._data
        return (
            int.from_bytes(data[at : at + step], "big"),
            int.from_bytes(data[at + step : at + 2 * step], "big"),
            int.from_bytes(data[at + 2 * step : at + 2 * step + PORT_BYTES], "big"),
            int.from_bytes(data[at + 2 * step + PORT_BYTES : at + self._size], "big"),
        )


def releasable(*groups: Targets) -> list[Target]:
    """The Target objects of these groups, for free_in_pieces (a Prepared has none: its few
    long strings go at once)."""
    return [target for group in groups if not isinstance(group, Prepared) for target in group]

"""Targets and their flattening into disjoint boxes: examples, then properties on a small
universe where every (address, port) can be checked."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.targets import MAX_WORK, Box, Target, disjoint

from .fakes import make_target


def boxes(*items: str | tuple[str, int, int], version: int = 4) -> list[str]:
    return [
        f"{box.address_text()} . {box.port_text()}"
        for box in disjoint(map(make_target, items), version)
    ]


def test_target_from_wire_and_text() -> None:
    target = Target.from_wire(("10.0.0.0/8", 1, 65535))
    assert (target.network, target.all_ports, target.version) == (
        ipaddress.ip_network("10.0.0.0/8"),
        True,
        4,
    )
    assert str(target) == "10.0.0.0/8"
    assert str(Target.from_wire(("fd00::/8", 80, 90))) == "fd00::/8 port 80-90"


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ((), []),
        (("10.0.0.0/8",), ["10.0.0.0/8 . 1-65535"]),
        (("10.0.0.1/32",), ["10.0.0.1 . 1-65535"]),
        ((("10.0.0.1/32", 80, 80),), ["10.0.0.1 . 80"]),
        # contained: absorbed
        (("10.0.0.0/8", ("10.1.2.3/32", 80, 90)), ["10.0.0.0/8 . 1-65535"]),
        # neighbours join, into a prefix or a range
        (("10.0.0.0/25", "10.0.0.128/25"), ["10.0.0.0/24 . 1-65535"]),
        (("10.0.0.1/32", "10.0.0.2/32"), ["10.0.0.1-10.0.0.2 . 1-65535"]),
        # same addresses, ports overlapping or adjacent: joined
        ((("10.0.0.0/8", 80, 90), ("10.0.0.0/8", 85, 100)), ["10.0.0.0/8 . 80-100"]),
        ((("10.0.0.0/8", 80, 90), ("10.0.0.0/8", 91, 91)), ["10.0.0.0/8 . 80-91"]),
        # same addresses, ports apart: two boxes
        (
            (("10.0.0.0/8", 80, 80), ("10.0.0.0/8", 443, 443)),
            ["10.0.0.0/8 . 80", "10.0.0.0/8 . 443"],
        ),
        # partial overlap: the overlap gets the union
        (
            (("10.0.0.0/24", 80, 90), ("10.0.0.128/25", 85, 99)),
            ["10.0.0.0/25 . 80-90", "10.0.0.128/25 . 80-99"],
        ),
        # the whole space
        (("0.0.0.0/0",), ["0.0.0.0/0 . 1-65535"]),
        (("255.255.255.255/32", "0.0.0.0/32"), ["0.0.0.0 . 1-65535", "255.255.255.255 . 1-65535"]),
    ],
)
def test_disjoint_examples(
    items: tuple[str | tuple[str, int, int], ...], expected: list[str]
) -> None:
    assert boxes(*items) == expected


def test_disjoint_takes_one_version() -> None:
    items = ("10.0.0.0/8", "fd00::/8", "::/0")
    assert boxes(*items, version=4) == ["10.0.0.0/8 . 1-65535"]
    assert boxes(*items, version=6) == ["::/0 . 1-65535"]


def test_disjoint_leaves_no_cache_in_the_networks() -> None:
    # A session keeps its targets for its whole life: a broadcast address cached in each
    # network by the sweep would cost memory as long (46 MB per 100,000 targets).
    targets = [make_target(item) for item in ("10.0.0.0/8", "10.1.0.0/16", "fd00::/8")]
    disjoint(targets, 4)
    disjoint(targets, 6)
    for target in targets:
        assert "broadcast_address" not in vars(target.network)
        assert "hostmask" not in vars(target.network)


def test_ipv6_address_text() -> None:
    assert boxes("fd00:5e::1/128", "fd00:5e::2/127", version=6) == [
        "fd00:5e::1-fd00:5e::3 . 1-65535"
    ]


def test_too_much_overlap_is_refused() -> None:
    # Every target covers all the others' addresses, each with its own port: the sweep
    # would look at ~n*n port ranges.
    n = int(MAX_WORK**0.5) + 10
    many = [Target(ipaddress.ip_network("10.0.0.0/8"), i + 1, i + 1) for i in range(n)]
    many += [Target(ipaddress.ip_network(f"10.0.{i // 256}.{i % 256}/32")) for i in range(n)]
    with pytest.raises(RequestError, match="overlap in too many ways"):
        disjoint(many, 4)


# --- properties ------------------------------------------------------------------------

# A small universe: addresses 10.0.0.0-10.0.0.31 (so prefixes /27 to /32), ports 1-12.
small_targets = st.builds(
    lambda prefix, index, first, span: Target(
        ipaddress.ip_network(f"10.0.0.{(index % (1 << (prefix - 27))) << (32 - prefix)}/{prefix}"),
        first,
        min(first + span, 12),
    ),
    prefix=st.integers(27, 32),
    index=st.integers(0, 31),
    first=st.integers(1, 12),
    span=st.integers(0, 11),
)
BASE = int(ipaddress.IPv4Address("10.0.0.0"))


def covered(items: list[Target] | list[Box], address: int, port: int) -> bool:
    for item in items:
        if isinstance(item, Target):
            first = int(item.network.network_address)
            last = int(item.network.broadcast_address)
        else:
            first, last = item.first, item.last
        if first <= address <= last and item.first_port <= port <= item.last_port:
            return True
    return False


@settings(max_examples=300, deadline=None)
@given(targets=st.lists(small_targets, max_size=8))
def test_disjoint_covers_the_same_and_never_overlaps(targets: list[Target]) -> None:
    result = disjoint(targets, 4)
    for address in range(BASE, BASE + 32):
        for port in range(1, 13):
            hits = sum(
                box.first <= address <= box.last and box.first_port <= port <= box.last_port
                for box in result
            )
            assert hits == covered(targets, address, port)  # 0 or 1: never two boxes
    assert len(result) <= 2 * len(targets) ** 2 + 1


@settings(max_examples=100, deadline=None)
@given(targets=st.lists(small_targets, max_size=8))
def test_disjoint_text_parses_back(targets: list[Target]) -> None:
    for box in disjoint(targets, 4):
        text = box.address_text()
        if "-" in text:
            first, last = (ipaddress.ip_address(part) for part in text.split("-"))
            assert (int(first), int(last)) == (box.first, box.last)
        else:
            network = ipaddress.ip_network(text)
            assert (int(network.network_address), int(network.broadcast_address)) == (
                box.first,
                box.last,
            )

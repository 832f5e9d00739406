"""Targets as a child prepared them (offload.wire_of, read back by offload.prepared_of) give
every method the same rules, and the reply-socket checks the same answers, as the Targets
themselves: properties on a small universe where every (address, port) is looked at."""

from __future__ import annotations

import dataclasses
import ipaddress

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shuttle_firewalld.methods import nat, nft, tproxy
from shuttle_firewalld.offload import prepared_of, wire_of
from shuttle_firewalld.prepared import Prepared, covers, nat_matches, releasable, versions_of
from shuttle_firewalld.session import Session
from shuttle_firewalld.targets import MAX_WORK, Target

from .fakes import make_session

BASE = {4: int(ipaddress.ip_address("10.0.0.0")), 6: int(ipaddress.ip_address("fd00::"))}
PORTS = (1, 2, 3, 80, 65535)


def prepare(targets: tuple[Target, ...], method: str, protocol: bool) -> Prepared:
    """What the parent holds of the targets once a child prepared them, over the wire."""
    wire = msgpack.packb(wire_of(targets, method, protocol), use_bin_type=True)
    value = msgpack.unpackb(wire, use_list=False, raw=False, strict_map_key=False)
    return prepared_of(value, method)


def prepared_session(session: Session) -> Session:
    subnets, excludes = session.subnets, session.excludes
    assert isinstance(subnets, tuple) and isinstance(excludes, tuple)
    return dataclasses.replace(
        session,
        subnets=prepare(subnets, session.method, True),
        excludes=prepare(excludes, session.method, False),
    )


@st.composite
def small_targets(draw: st.DrawFn, version: int) -> Target:
    """A network inside 16 addresses of BASE, on a few port ranges."""
    prefix = draw(st.integers(0, 4))
    size = 1 << (4 - prefix)
    first = BASE[version] + draw(st.integers(0, 16 // size - 1)) * size
    bits = 32 if version == 4 else 128
    first_port, last_port = sorted(draw(st.sampled_from(PORTS)) for _ in range(2))
    network = ipaddress.ip_network((first, bits - 4 + prefix))
    return Target(network, first_port, last_port)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([4, 6]), st.data())
def test_prepared_boxes_cover_what_the_targets_cover(version: int, data: st.DataObject) -> None:
    targets = tuple(data.draw(st.lists(small_targets(version), max_size=6)))
    prepared = prepare(targets, "tproxy", True)
    assert len(prepared) == len(targets)
    assert versions_of(prepared) == versions_of(targets)
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    for offset in range(-1, 18):  # one address below and above the universe too
        address = make(BASE[version] + offset)
        for port in (*PORTS, 4, 79, 81, 65534):
            assert covers(prepared, address, port) == covers(targets, address, port)


@pytest.mark.parametrize(
    ("subnets", "excludes"),
    [
        (["10.0.0.0/8", ("10.1.2.3/32", 80, 90)], ["10.1.0.0/16", ("10.2.0.1/32", 22, 22)]),
        (["fd00::/8", "10.0.0.0/24"], ["fd00::5/128", "10.0.0.7/32"]),
        ([("192.0.2.0/25", 80, 80), ("192.0.2.0/24", 443, 443)], []),
    ],
)
def test_each_method_writes_the_same_rules_from_prepared_targets(
    subnets: list[str | tuple[str, int, int]], excludes: list[str | tuple[str, int, int]]
) -> None:
    session = make_session(subnets, excludes, method="nft", dns=["192.0.2.53"])
    assert nft.ruleset(prepared_session(session)) == nft.ruleset(session)
    session = dataclasses.replace(session, method="tproxy")
    assert tproxy.ruleset(prepared_session(session), 0x5E00) == tproxy.ruleset(session, 0x5E00)
    session = dataclasses.replace(session, method="nat")
    for version in session.versions:
        assert nat.apply_text(prepared_session(session), version) == nat.apply_text(
            session, version
        )


def test_prepared_targets_hold_only_their_methods_text() -> None:
    targets = (Target(ipaddress.ip_network("10.0.0.0/8")),)
    prepared = prepare(targets, "nft", True)
    with pytest.raises(ValueError, match="prepared for nft"):
        nat_matches(prepared, 4)
    # Another version than the targets': nothing, whatever the method.
    assert nat_matches(prepared, 6) == []


@pytest.mark.parametrize("method", ["nat", "nft", "tproxy"])
def test_every_method_can_tell_what_prepared_targets_cover(method: str) -> None:
    # Shortcuts ask it of nat and nft sessions, reply sockets of tproxy ones.
    prepared = prepare((Target(ipaddress.ip_network("10.0.0.0/8"), 80, 90),), method, True)
    assert covers(prepared, ipaddress.ip_address("10.9.0.1"), 80)
    assert not covers(prepared, ipaddress.ip_address("10.9.0.1"), 91)
    assert not covers(prepared, ipaddress.ip_address("fd00::1"), 80)


def test_nat_targets_that_overlap_too_much_still_prepare_without_boxes() -> None:
    # As in test_targets: disjoint refuses them, which nat's rules never needed.
    n = int(MAX_WORK**0.5) + 10
    many = [Target(ipaddress.ip_network("10.0.0.0/8"), i + 1, i + 1) for i in range(n)]
    many += [Target(ipaddress.ip_network(f"10.0.{i // 256}.{i % 256}/32")) for i in range(n)]
    prepared = prepare(tuple(many), "nat", True)
    assert len(nat_matches(prepared, 4)) == 2 * n
    with pytest.raises(ValueError, match="prepared for nat hold no boxes"):
        covers(prepared, ipaddress.ip_address("10.0.0.1"), 80)


def test_only_target_objects_are_freed_in_pieces() -> None:
    targets = (Target(ipaddress.ip_network("10.0.0.0/8")),)
    assert releasable(targets, prepare(targets, "nft", True), ()) == list(targets)

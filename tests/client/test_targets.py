"""sshuttle's subnet syntax, as the client parses it; and Scope, what a session captures."""

import ipaddress
import socket
from types import SimpleNamespace
from typing import List

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from shuttle_client import targets
from shuttle_client.targets import (
    LOCAL_CACHE,
    LOCAL_TTL,
    Scope,
    TargetError,
    is_local,
    parse_target,
    parse_targets,
)

ALL = (1, 65535)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.3", [("10.1.2.3/32", *ALL)]),
        ("10.1.2.3/16", [("10.1.0.0/16", *ALL)]),
        ("10.1.0.0/16:80", [("10.1.0.0/16", 80, 80)]),
        ("10.1.0.0/16:8000-8099", [("10.1.0.0/16", 8000, 8099)]),
        ("0/0", [("0.0.0.0/0", *ALL)]),
        ("0/0:22", [("0.0.0.0/0", 22, 22)]),
        ("::/0", [("::/0", *ALL)]),
        ("fd00:5e::/32", [("fd00:5e::/32", *ALL)]),
        ("fd00:5e::1", [("fd00:5e::1/128", *ALL)]),
        ("[fd00:5e::]/32:443", [("fd00:5e::/32", 443, 443)]),
        ("[fd00:5e::1]:1-1024", [("fd00:5e::1/128", 1, 1024)]),
        ("[::1]", [("::1/128", *ALL)]),
    ],
)
def test_forms(text: str, expected: list) -> None:
    assert parse_target(text) == expected


def test_a_name_is_each_of_its_addresses_as_a_host() -> None:
    # Debian's /etc/hosts gives localhost ::1 too, other machines 127.0.0.1 only.
    found = dict.fromkeys(info[4][0] for info in socket.getaddrinfo("localhost", None))
    hosts = [f"{address}/{128 if ':' in address else 32}" for address in found]
    assert "127.0.0.1/32" in hosts
    assert parse_target("localhost:8080") == [(host, 8080, 8080) for host in hosts]


@pytest.mark.parametrize(
    "text",
    [
        "10.1.2.3:0",
        "10.1.2.3:70000",
        "10.1.2.3:90-80",
        "10.0.0.0/33",
        "[fd00::]/129",
        "fe80::1%eth0",
        "[fe80::1%eth0]:22",
        "10.1.2.3:",
        "10.1.2.3:a",
        "[10.1.2.3",
        "a b",
        "",
        "fd00::1:80-90x",
        "host/24",
    ],
)
def test_bad_input_is_one_clear_error_naming_it(text: str) -> None:
    with pytest.raises(TargetError) as raised:
        parse_target(text)
    assert repr(text) in str(raised.value)


def test_unknown_host_name_says_so() -> None:
    with pytest.raises(TargetError, match=r"cannot resolve 'no-such-host\.invalid'"):
        parse_target("no-such-host.invalid:80")


@pytest.mark.parametrize("text", ["::ffff:10.0.0.1", "[::ffff:a00:0]/104:80", "::ffff:0:0/96"])
def test_ipv4_mapped_subnets_are_refused(text: str) -> None:
    with pytest.raises(TargetError, match="IPv4-mapped; write it as IPv4"):
        parse_target(text)


def test_duplicates_are_merged_in_order() -> None:
    assert parse_targets(["10.0.0.1/8", "10.2.0.0/16", "10.0.0.0/8"]) == (
        ("10.0.0.0/8", *ALL),
        ("10.2.0.0/16", *ALL),
    )


@given(st.ip_addresses(), st.integers(1, 65535), st.integers(0, 1000))
def test_any_address_with_ports_round_trips(address: object, first: int, span: int) -> None:
    assume(getattr(address, "ipv4_mapped", None) is None)  # refused: see the next test
    last = min(first + span, 65535)
    text = str(address)
    written = f"[{text}]:{first}-{last}" if ":" in text else f"{text}:{first}-{last}"
    (network, low, high), *rest = parse_target(written)
    assert rest == []
    assert network.split("/")[0] == text
    assert (low, high) == (first, last)


def test_scope_captures_as_the_rules_do() -> None:
    scope = Scope(
        [("0.0.0.0/0", *ALL), ("2001:db8::/32", 443, 443), ("10.1.0.0/16", 80, 90)],
        [("192.0.2.0/24", *ALL), ("0.0.0.0/0", 25, 25)],
        ["127.0.0.53", "::1"],
    )
    assert scope.captures(("198.51.100.7", 22))
    assert scope.captures(("10.1.2.3", 85))
    assert not scope.captures(("192.0.2.9", 80))  # excluded
    assert not scope.captures(("198.51.100.7", 25))  # an excluded port
    assert scope.captures(("2001:db8::1", 443))
    assert not scope.captures(("2001:db8::1", 80))  # outside the port range
    assert not scope.captures(("2001:db9::1", 443))  # outside the subnets
    # This host's own addresses, though inside 0/0: the rules never capture them.
    assert not scope.captures(("127.0.0.1", 8080))
    assert not scope.captures(("127.0.0.5", 8080))
    assert not scope.captures(("::ffff:198.51.100.7", 22))
    # Port 53 of a nameserver, local or not: DNS is captured before the local return.
    assert scope.captures(("127.0.0.53", 53))
    assert scope.captures(("::1", 53))
    assert not scope.captures(("127.0.0.53", 54))


def test_a_scope_keeps_is_locals_answer_for_local_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: List[str] = []
    local = {"10.0.0.1"}
    clock = [100.0]
    monkeypatch.setattr(targets, "is_local", lambda host: asked.append(host) or host in local)
    monkeypatch.setattr(targets, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    scope = Scope([("10.0.0.0/8", *ALL)], [], [])
    assert not scope.captures(("10.0.0.1", 80)) and not scope.captures(("10.0.0.1", 81))
    assert scope.captures(("10.0.0.2", 80)) and scope.captures(("10.0.0.2", 80))
    assert asked == ["10.0.0.1", "10.0.0.2"]  # once each
    local.add("10.0.0.2")  # an address this host takes
    clock[0] += LOCAL_TTL - 0.01
    assert scope.captures(("10.0.0.2", 80))  # as it was, within LOCAL_TTL
    clock[0] += 0.02
    assert not scope.captures(("10.0.0.2", 80))  # asked again
    assert asked == ["10.0.0.1", "10.0.0.2", "10.0.0.2"]


def test_a_scope_keeps_at_most_local_cache_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: List[str] = []
    monkeypatch.setattr(targets, "is_local", lambda host: bool(asked.append(host)))
    scope = Scope([("10.0.0.0/8", *ALL)], [], [])
    hosts = [str(ipaddress.ip_address("10.0.0.0") + n) for n in range(LOCAL_CACHE + 1)]
    for host in hosts:
        scope.captures((host, 80))
    scope.captures((hosts[0], 80))  # the cache started over at LOCAL_CACHE + 1
    assert len(asked) == LOCAL_CACHE + 2


def test_is_local_asks_the_routing() -> None:
    assert is_local("127.0.0.1") and is_local("::1")
    assert not is_local("192.0.2.1")  # TEST-NET-1: nobody's

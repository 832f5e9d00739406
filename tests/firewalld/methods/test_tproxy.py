"""The tproxy method: the exact ruleset, the ip commands, slots, undo on failure and stale
leftovers; then for real, in a namespace, with a client of another uid."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import subprocess
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import pytest
from shuttle_client.firewall_session import FirewallError
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.methods import tproxy
from shuttle_firewalld.methods.nft import NFT, replace_text
from shuttle_firewalld.methods.tproxy import (
    MARK_BASE,
    PROBE,
    SLOTS,
    TproxyMethod,
    chains,
    flow_sets,
    mark_of,
    route_commands,
    ruleset,
    stale_rules,
    stale_tables,
)
from shuttle_firewalld.session import Session
from shuttle_firewalld.transparent import IP_RECVORIGDSTADDR, IPV6_RECVORIGDSTADDR, Flow

from firewalld.captures import close_session, open_session, update_session
from firewalld.daemon import IP, NOBODY, WAIT, Daemon, nft, nft_set_sizes, shuttle_tables
from firewalld.fakes import make_session, make_target
from firewalld.traffic import NAMESERVERS, connect, query, query_argv
from testbed import reply_attacker
from testbed.procs import Dialogue


def flow(program: str, program_port: int, destination: str, port: int) -> Flow:
    return Flow(
        ipaddress.ip_address(program), program_port, ipaddress.ip_address(destination), port
    )


TABLE = "shuttle-0123456789ab"
MARK = 0x53480001  # slot 1
TABLE_ID = "1397227521"  # the same number, as ip writes a table


def test_marks_and_tables_are_our_range() -> None:
    assert (mark_of(1), mark_of(SLOTS)) == (MARK, MARK_BASE + 256)
    assert MARK == int(TABLE_ID)


def test_ruleset_ipv4_own_traffic() -> None:
    session = make_session(["10.0.0.0/8"], ["10.1.0.0/16"], method="tproxy", port=41000, uid=0)
    for program_port in (40000, 40001):  # the flows its reply sockets answer
        session.flows[flow("10.9.0.1", program_port, "10.0.0.5", 53)] = None
    assert (
        ruleset(session, MARK)
        == f"""\
create table inet {TABLE}
table inet {TABLE} {{
\tset exclude4 {{
\t\ttype ipv4_addr . inet_service
\t\tflags interval
\t\telements = {{
\t\t\t10.1.0.0/16 . 1-65535
\t\t}}
\t}}
\tset include4 {{
\t\ttype ipv4_addr . inet_service
\t\tflags interval
\t\telements = {{
\t\t\t10.0.0.0/8 . 1-65535
\t\t}}
\t}}
\tset flows4 {{
\t\ttype ipv4_addr . inet_service . ipv4_addr . inet_service
\t\telements = {{
\t\t\t10.9.0.1 . 40000 . 10.0.0.5 . 53,
\t\t\t10.9.0.1 . 40001 . 10.0.0.5 . 53
\t\t}}
\t}}
\tset flows6 {{
\t\ttype ipv6_addr . inet_service . ipv6_addr . inet_service
\t}}
\tchain replies {{
\t\ttype filter hook output priority mangle - 10; policy accept;
\t\tmeta mark != 0x53488001 return
\t\tip daddr . udp dport . ip saddr . udp sport @flows4 accept
\t\tip6 daddr . udp dport . ip6 saddr . udp sport @flows6 accept
\t\tdrop
\t}}
\tchain output {{
\t\ttype route hook output priority mangle; policy accept;
\t\tfib daddr type local return
\t\tip daddr 127.0.0.0/8 return
\t\tip daddr . th dport @exclude4 return
\t\tmeta l4proto {{ tcp, udp }} meta skuid 0 ip daddr . th dport @include4 meta mark set 0x53480001
\t}}
\tchain prerouting {{
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tmeta mark != 0x53480001 return
\t\tfib daddr type local return
\t\tip daddr 127.0.0.0/8 return
\t\tip daddr . th dport @exclude4 return
\t\tmeta l4proto {{ tcp, udp }} ip daddr . th dport @include4 tproxy ip to 127.0.0.1:41000
\t}}
}}
"""
    )


def test_chains_of_both_versions_with_an_owner_group() -> None:
    session = make_session(
        [("10.0.0.0/8", 53, 53), ("fd00:5e::/32", 443, 443)], method="tproxy", port=41000, gid=100
    )
    assert chains(session, MARK + 1) == [
        (
            "replies",
            "filter hook output priority mangle - 10",
            [
                "meta mark != 0x53488002 return",
                "ip daddr . udp dport . ip saddr . udp sport @flows4 accept",
                "ip6 daddr . udp dport . ip6 saddr . udp sport @flows6 accept",
                "drop",
            ],
        ),
        (
            "output",
            "route hook output priority mangle",
            [
                "fib daddr type local return",
                "ip daddr 127.0.0.0/8 return",
                "ip daddr . th dport @exclude4 return",
                "meta l4proto { tcp, udp } meta skuid 1000 meta skgid 100 "
                "ip daddr . th dport @include4 meta mark set 0x53480002",
                "ip6 daddr ::1 return",
                "ip6 daddr . th dport @exclude6 return",
                "meta l4proto { tcp, udp } meta skuid 1000 meta skgid 100 "
                "ip6 daddr . th dport @include6 meta mark set 0x53480002",
            ],
        ),
        (
            "prerouting",
            "filter hook prerouting priority mangle",
            [
                "meta mark != 0x53480002 return",
                "fib daddr type local return",
                "ip daddr 127.0.0.0/8 return",
                "ip daddr . th dport @exclude4 return",
                "meta l4proto { tcp, udp } ip daddr . th dport @include4 "
                "tproxy ip to 127.0.0.1:41000",
                "ip6 daddr ::1 return",
                "ip6 daddr . th dport @exclude6 return",
                "meta l4proto { tcp, udp } ip6 daddr . th dport @include6 "
                "tproxy ip6 to [::1]:41000",
            ],
        ),
    ]


def test_every_uid_means_no_owner_match() -> None:
    session = make_session(["fd00:5e::/32"], method="tproxy", uid=-1)
    assert "meta sk" not in ruleset(session, MARK)


def test_route_commands_ipv4_and_ipv6() -> None:
    session = make_session(["10.0.0.0/8", "fd00:5e::/32"], method="tproxy")
    assert route_commands(session.versions, MARK, "add") == [
        ["ip", "-4", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", TABLE_ID],
        ["ip", "-4", "rule", "add", "fwmark", "0x53480001", "lookup", TABLE_ID],
        ["ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", TABLE_ID],
        ["ip", "-6", "rule", "add", "fwmark", "0x53480001", "lookup", TABLE_ID],
    ]
    # Deleting: each rule before the route it points at.
    assert route_commands(session.versions, MARK, "del") == [
        ["ip", "-4", "rule", "del", "fwmark", "0x53480001", "lookup", TABLE_ID],
        ["ip", "-4", "route", "del", "local", "0.0.0.0/0", "dev", "lo", "table", TABLE_ID],
        ["ip", "-6", "rule", "del", "fwmark", "0x53480001", "lookup", TABLE_ID],
        ["ip", "-6", "route", "del", "local", "::/0", "dev", "lo", "table", TABLE_ID],
    ]


def test_route_commands_ipv6_only() -> None:
    session = make_session(["fd00:5e::/32"], ["10.0.0.0/8"], method="tproxy")
    assert [argv[1] for argv in route_commands(session.versions, MARK, "add")] == ["-6", "-6"]


class FakeRun:
    """Records each tool run; fails runs whose argv or stdin contains a given text."""

    def __init__(self, fail: Sequence[str] = (), outputs: dict[str, str] | None = None) -> None:
        self.runs: list[tuple[list[str], str]] = []
        self.fail = fail
        self.outputs = outputs or {}

    def __call__(self, argv: Sequence[str], stdin: str) -> str:
        self.runs.append((list(argv), stdin))
        text = " ".join(argv) + "\n" + stdin
        if any(part in text for part in self.fail):
            raise RequestError(f"{argv[0]} failed (exit 2): Error: no")
        return self.outputs.get(" ".join(argv), "")


class FakeListeners:
    """Ordinary unbound sockets where the method would make transparent ones."""

    def __init__(self) -> None:
        self.made: list[socket.socket] = []

    def __call__(self, versions: Collection[int]) -> tuple[int, dict[str, socket.socket]]:
        sockets = {}
        for version in sorted(versions):
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            sockets[f"tcp{version}"] = socket.socket(family, socket.SOCK_STREAM)
            sockets[f"udp{version}"] = socket.socket(family, socket.SOCK_DGRAM)
        self.made += sockets.values()
        return 41000, sockets


@pytest.fixture
def listeners() -> Iterator[FakeListeners]:
    made = FakeListeners()
    yield made
    for sock in made.made:
        sock.close()


def test_apply_makes_sockets_then_routes_and_rules_then_the_table(
    listeners: FakeListeners,
) -> None:
    run = FakeRun()
    session = make_session(["10.0.0.0/8", "fd00:5e::/32"], method="tproxy", port=1)
    assert TproxyMethod(run, listeners).apply(session) == 19 + 4
    assert session.port == 41000
    assert sorted(session.sockets) == ["tcp4", "tcp6", "udp4", "udp6"]
    assert run.runs == [
        *((argv, "") for argv in route_commands(session.versions, MARK, "add")),
        (list(NFT), ruleset(session, MARK)),
    ]


def test_each_session_gets_a_free_slot(listeners: FakeListeners) -> None:
    run = FakeRun()
    method = TproxyMethod(run, listeners)
    first, second, third = (make_session(method="tproxy") for _ in range(3))
    for number, session in enumerate((first, second, third)):
        session.id = f"{number}" * 32
    method.apply(first)
    method.apply(second)
    assert "meta mark set 0x53480002" in run.runs[-1][1]
    method.remove(first)
    method.apply(third)  # slot 1 is free again
    assert "meta mark set 0x53480001" in run.runs[-1][1]


def test_slots_run_out(listeners: FakeListeners) -> None:
    method = TproxyMethod(FakeRun(), listeners)
    for number in range(SLOTS):
        session = make_session(method="tproxy")
        session.id = f"{number:032x}"
        method.apply(session)
    with pytest.raises(RequestError, match="all 256 tproxy sessions of this host are in use"):
        method.apply(make_session(method="tproxy"))


@pytest.mark.parametrize(
    ("failing", "undone"),
    [
        ("create table", ["-6 rule del", "-6 route del", "-4 rule del", "-4 route del"]),
        ("-6 route add", ["-4 rule del", "-4 route del"]),
        ("-4 route add", []),
    ],
)
def test_a_failure_undoes_what_was_done_and_closes_the_sockets(
    listeners: FakeListeners, failing: str, undone: list[str]
) -> None:
    run = FakeRun(fail=[failing])
    session = make_session(["10.0.0.0/8", "fd00:5e::/32"], method="tproxy")
    with pytest.raises(RequestError, match="failed"):
        TproxyMethod(run, listeners).apply(session)
    steps = [" ".join(argv[1:4]) if argv[0] == "ip" else stdin for argv, stdin in run.runs]
    failed_at = next(index for index, step in enumerate(steps) if failing in step)
    assert steps[failed_at + 1 :] == undone
    assert session.sockets == {}
    assert all(sock.fileno() == -1 for sock in listeners.made)


def test_forward_is_refused_before_anything_is_made(listeners: FakeListeners) -> None:
    run = FakeRun()
    with pytest.raises(RequestError, match="does not capture forwarded traffic; ask for nft or"):
        TproxyMethod(run, listeners).apply(make_session(method="tproxy", forward=True))
    assert (run.runs, listeners.made) == ([], [])


def test_nameservers_are_marked_and_diverted_before_any_return() -> None:
    session = make_session(
        ["10.0.0.0/8"], ["10.53.0.0/16"], method="tproxy", port=41000, dns=["10.53.0.53"]
    )
    _, (_, _, output), (_, _, prerouting) = chains(session, MARK)
    assert output[:2] == [
        "meta l4proto { tcp, udp } meta skuid 1000 ip daddr { 10.53.0.53 } th dport 53 "
        "meta mark set 0x53480001",
        "fib daddr type local return",
    ]
    assert prerouting[:3] == [
        "meta mark != 0x53480001 return",
        "meta l4proto { tcp, udp } ip daddr { 10.53.0.53 } th dport 53 "
        "tproxy ip to 127.0.0.1:41000",
        "fib daddr type local return",
    ]


def test_an_ipv6_nameserver_brings_ipv6_sockets_routes_and_rules(
    listeners: FakeListeners,
) -> None:
    run = FakeRun()
    session = make_session(["10.0.0.0/8"], method="tproxy", dns=["fd00:53::53"])
    TproxyMethod(run, listeners, lambda address: False).apply(session)
    assert sorted(session.sockets) == ["tcp4", "tcp6", "udp4", "udp6"]
    assert [argv[1] for argv, _ in run.runs[:-1]] == ["-4", "-4", "-6", "-6"]
    assert "ip6 daddr { fd00:53::53 } th dport 53 tproxy ip6 to [::1]:41000" in run.runs[-1][1]


@pytest.mark.parametrize("nameserver", ["127.0.0.53", "::1", "198.18.0.1"])
def test_a_nameserver_on_this_host_is_refused_before_anything_is_made(
    listeners: FakeListeners, nameserver: str
) -> None:
    run = FakeRun()
    method = TproxyMethod(run, listeners, lambda address: str(address) == "198.18.0.1")
    session = make_session(method="tproxy", dns=["10.53.0.53", nameserver])
    with pytest.raises(RequestError) as refused:
        method.apply(session)
    assert str(refused.value) == (
        f"the tproxy method cannot capture DNS to {nameserver}, an address of this host: its "
        "answers would need a socket there on port 53, where other users' queries could reach "
        "it; use --ns-hosts with a nameserver that is not on this host (not loopback), or the "
        "nft or nat method"
    )
    assert (run.runs, listeners.made) == ([], [])


def test_remove_deletes_everything_and_closes_the_sockets(listeners: FakeListeners) -> None:
    run = FakeRun(fail=["-4 rule del"])  # one step failing does not stop the others
    method = TproxyMethod(run, listeners)
    session = make_session(["10.0.0.0/8", "fd00:5e::/32"], method="tproxy")
    method.apply(session)
    run.runs.clear()
    method.remove(session)
    assert run.runs == [
        (list(NFT), f"delete table inet {TABLE}\n"),
        *((argv, "") for argv in route_commands(session.versions, MARK, "del")),
    ]
    assert all(sock.fileno() == -1 for sock in listeners.made)
    run.runs.clear()
    method.remove(session)  # a second time: nothing left to do
    assert run.runs == []


def test_an_update_swaps_the_table_and_keeps_routes_and_sockets(listeners: FakeListeners) -> None:
    run = FakeRun()
    method = TproxyMethod(run, listeners)
    session = make_session(["10.0.0.0/8", "fd00:5e::/32"], method="tproxy")
    method.apply(session)
    sockets = dict(session.sockets)
    run.runs.clear()
    subnets = (make_target("192.0.2.0/24"),)
    session.flows[flow("fd00:5e::1", 40000, "fd00:5e::5", 53)] = None  # a reply socket is out
    new = make_session(["192.0.2.0/24"], method="tproxy", port=41000)
    new.flows = session.flows
    # IPv4 only now: 13 rules in the table, and the 4 rules and routes of both versions.
    assert method.update(session, subnets, ()) == 13 + 4
    assert run.runs == [(list(NFT), replace_text(new, chains(new, MARK), flow_sets(new)))]
    # The flow's element stays, whatever the new table captures (Sessions decides on that).
    assert "\t\t\tfd00:5e::1 . 40000 . fd00:5e::5 . 53\n" in run.runs[0][1]
    assert session.sockets == sockets
    # Removal still deletes the IPv6 rule and route made at open.
    run.runs.clear()
    session.subnets = subnets
    method.remove(session)
    assert run.runs[1:] == [(argv, "") for argv in route_commands((4, 6), MARK, "del")]


def test_an_update_cannot_add_an_ip_version_without_sockets(listeners: FakeListeners) -> None:
    run = FakeRun()
    method = TproxyMethod(run, listeners)
    session = make_session(["10.0.0.0/8"], method="tproxy")
    method.apply(session)
    run.runs.clear()
    with pytest.raises(RequestError) as refused:
        method.update(session, (make_target("10.0.0.0/8"), make_target("fd00::/8")), ())
    assert str(refused.value) == (
        "this tproxy session has no IPv6 sockets (it was opened without IPv6 subnets): "
        "capturing IPv6 needs a new session"
    )
    assert run.runs == []
    method.remove(session)


# `ip -j rule show` and `ip -j route show table all`, as iproute2 6.1 prints them.
RULES = json.dumps(
    [
        {"priority": 0, "src": "all", "table": "local"},
        {"priority": 32764, "src": "all", "fwmark": "0x53480005", "table": "1397227525"},
        {"priority": 32763, "src": "all", "fwmark": "0x53480006", "table": "100"},
        {"priority": 32762, "src": "all", "fwmark": "0x1", "table": "1397227525"},
        {
            "priority": 32761,
            "src": "all",
            "fwmark": "0x53480007",
            "fwmask": "0xffff",
            "table": "1397227527",
        },
        {"priority": 32760, "src": "all", "fwmark": "0x53480108", "table": "1397227784"},
        {"priority": 32765, "src": "all", "fwmark": "0x53480001", "table": "1397227521"},
        {"priority": 32766, "src": "all", "table": "main"},
    ]
)
ROUTES = json.dumps(
    [
        {"type": "local", "dst": "default", "dev": "lo", "table": "1397227525", "scope": "host"},
        {"type": "local", "dst": "default", "dev": "lo", "table": "1397227521", "scope": "host"},
        {"type": "local", "dst": "default", "dev": "lo", "table": "100", "scope": "host"},
        {"type": "local", "dst": "default", "dev": "lo", "table": "1397227777", "scope": "host"},
        {"dst": "198.18.0.0/15", "dev": "fwt0", "protocol": "kernel", "scope": "link"},
        {"type": "local", "dst": "127.0.0.1", "dev": "lo", "table": "local"},
    ]
)


# --- reply sockets: the routing's word, the socket, the flow's element ---------------------

ROUTE_GET = ["ip", "-j", "route", "get"]
ADDRESSES4 = (
    '[{"ifname":"fwt0","addr_info":[{"family":"inet","local":"198.18.0.1","prefixlen":15}]}]'
)


class FakeReplySockets:
    """Ordinary sockets where the method would make fenced reply sockets; records how."""

    def __init__(self) -> None:
        self.made: list[tuple[Flow, int, str, socket.socket]] = []

    def __call__(self, flow: Flow, mark: int, device: str) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.made.append((flow, mark, device, sock))
        return sock


Fenced = tuple[TproxyMethod, FakeRun, FakeReplySockets, Session]


@pytest.fixture
def fenced() -> Iterator[Callable[..., Fenced]]:
    """Makes a tproxy method with an applied IPv4 session, whose `ip` says what the test
    gives (route: of every 198.18.0.x); closes every socket afterwards."""
    made: list[Fenced] = []

    def make(fail: Sequence[str] = (), route: str = '[{"dst":"198.18.0.5"}]') -> Fenced:
        outputs = {"ip -j -4 addr show": ADDRESSES4}
        outputs.update({" ".join([*ROUTE_GET, f"198.18.0.{n}"]): route for n in range(256)})
        run = FakeRun(fail, outputs)
        replies = FakeReplySockets()
        method = TproxyMethod(run, FakeListeners(), make_reply_socket=replies)
        session = make_session(["198.18.0.0/15"], method="tproxy")
        method.apply(session)
        run.runs.clear()
        made.append((method, run, replies, session))
        return made[-1]

    yield make
    for method, _, replies, session in made:
        method.remove(session)
        for *_, sock in replies.made:
            sock.close()


def test_a_reply_socket_is_marked_bound_to_the_programs_device_and_its_flow_fenced(
    fenced: Callable[..., Fenced],
) -> None:
    method, run, replies, session = fenced()
    answered = flow("198.18.0.1", 40000, "198.18.0.5", 53)
    sock = method.reply_socket(session, answered)
    assert replies.made == [(answered, 0x53488001, "fwt0", sock)]
    assert run.runs == [
        ([*ROUTE_GET, "198.18.0.5"], ""),
        (["ip", "-j", "-4", "addr", "show"], ""),
        (
            list(NFT),
            f"add element inet {TABLE} flows4 {{ 198.18.0.1 . 40000 . 198.18.0.5 . 53 }}\n",
        ),
    ]
    assert list(session.flows) == [answered]
    run.runs.clear()
    method.forget_flows(session, [answered, flow("198.18.0.1", 1, "198.18.0.5", 53)])
    assert run.runs == [
        (
            list(NFT),
            f"delete element inet {TABLE} flows4 {{ 198.18.0.1 . 40000 . 198.18.0.5 . 53 }}\n",
        )
    ]
    assert session.flows == {}


@pytest.mark.parametrize(
    ("route", "why"),
    [
        ('[{"type":"broadcast","dst":"198.18.0.5"}]', r"^198\.18\.0\.5:53 is a broadcast address"),
        ('[{"type":"local","dst":"198.18.0.5"}]', r"^198\.18\.0\.5:53 is this host's own address"),
        ("[]", r"^cannot read what ip says of 198\.18\.0\.5:53: not one route$"),
    ],
)
def test_no_reply_socket_where_the_routing_says_no(
    fenced: Callable[..., Fenced], route: str, why: str
) -> None:
    method, run, replies, session = fenced(route=route)
    with pytest.raises(RequestError, match=why):
        method.reply_socket(session, flow("198.18.0.1", 40000, "198.18.0.5", 53))
    assert (replies.made, session.flows) == ([], {})
    assert all(argv[0] == "ip" for argv, _ in run.runs)


def test_no_route_no_reply_socket(fenced: Callable[..., Fenced]) -> None:
    method, _, replies, session = fenced(fail=["route get"])
    with pytest.raises(RequestError, match=r"^cannot check the route to 198\.18\.0\.5:53: ip fail"):
        method.reply_socket(session, flow("198.18.0.1", 40000, "198.18.0.5", 53))
    assert replies.made == []


def test_a_flow_that_nft_refuses_gets_no_socket(fenced: Callable[..., Fenced]) -> None:
    method, _, replies, session = fenced(fail=["add element"])
    with pytest.raises(RequestError):
        method.reply_socket(session, flow("198.18.0.1", 40000, "198.18.0.5", 53))
    assert replies.made[0][3].fileno() == -1  # closed
    assert session.flows == {}


def test_the_oldest_flow_makes_room_for_a_new_one(
    fenced: Callable[..., Fenced], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tproxy, "MAX_FLOWS", 2)
    method, run, _, session = fenced()
    flows = [flow("198.18.0.1", 40000 + n, "198.18.0.5", 53) for n in range(3)]
    for item in flows[:2]:
        method.reply_socket(session, item)
    method.reply_socket(session, flows[0])  # asked again: the newest now, nothing goes
    run.runs.clear()
    method.reply_socket(session, flows[2])
    assert run.runs[-1] == (
        list(NFT),
        f"delete element inet {TABLE} flows4 {{ 198.18.0.1 . 40001 . 198.18.0.5 . 53 }}\n"
        f"add element inet {TABLE} flows4 {{ 198.18.0.1 . 40002 . 198.18.0.5 . 53 }}\n",
    )
    assert list(session.flows) == [flows[0], flows[2]]


def test_stale_rules_are_ours_only() -> None:
    # Ours: our mark, no mask, our table; 0x53480108 is slot 264, beyond the range.
    assert stale_rules(RULES) == [
        ["pref", "32764", "fwmark", "0x53480005", "lookup", "1397227525"],
        ["pref", "32765", "fwmark", "0x53480001", "lookup", "1397227521"],
    ]
    assert stale_rules("") == stale_rules("[]") == []
    with pytest.raises(ValueError):
        stale_rules("{}")


def test_stale_tables_are_ours_only() -> None:
    assert stale_tables(ROUTES) == [1397227521, 1397227525]  # 1397227777 is slot 257


def test_remove_stale_deletes_rules_and_flushes_tables_per_version() -> None:
    outputs = {"ip -4 -j rule show": RULES, "ip -6 -j route show table all": ROUTES}
    run = FakeRun(outputs=outputs)
    assert TproxyMethod(run).remove_stale() == 2
    assert [argv for argv, _ in run.runs] == [
        ["ip", "-4", "-j", "rule", "show"],
        ["ip", "-4", "-j", "route", "show", "table", "all"],
        [
            "ip",
            "-4",
            "rule",
            "del",
            "pref",
            "32764",
            "fwmark",
            "0x53480005",
            "lookup",
            "1397227525",
        ],
        [
            "ip",
            "-4",
            "rule",
            "del",
            "pref",
            "32765",
            "fwmark",
            "0x53480001",
            "lookup",
            "1397227521",
        ],
        ["ip", "-6", "-j", "rule", "show"],
        ["ip", "-6", "-j", "route", "show", "table", "all"],
        ["ip", "-6", "route", "flush", "table", "1397227521"],
        ["ip", "-6", "route", "flush", "table", "1397227525"],
    ]


def test_remove_stale_says_when_a_version_cannot_be_read() -> None:
    run = FakeRun(fail=["-6 -j rule"], outputs={"ip -4 -j rule show": RULES})
    with pytest.raises(RequestError, match=r"^IPv6: ip failed"):
        TproxyMethod(run).remove_stale()
    assert len([argv for argv, _ in run.runs if "del" in argv]) == 2  # IPv4 done all the same


def test_probe() -> None:
    run = FakeRun()
    assert TproxyMethod(run).probe() is None
    assert run.runs == [
        (list(NFT), PROBE),
        (list(NFT), "delete table inet shuttle-probe\n"),
        (["ip", "-4", "rule", "show"], ""),
    ]
    assert TproxyMethod(FakeRun(fail=["tproxy ip6"])).probe() == "nft failed (exit 2): Error: no"


# --- for real: a client of another uid, in a namespace --------------------------------------

TPROXY_NETWORKS = ("198.18.0.0/15", "fd00:5e::/32")


@pytest.fixture
def tproxy_net(netns: str) -> str:
    """The namespace with 198.18.0.1/15 and fd00:5e::1/32 on one end of a veth pair. Nothing
    answers there: whatever arrives, a tproxy session delivered it."""

    def run(*argv: str) -> None:
        subprocess.run([IP, "netns", "exec", netns, *argv], check=True, timeout=10)

    run("ip", "link", "add", "fwt0", "type", "veth", "peer", "name", "fwt1")
    for link in ("fwt0", "fwt1"):
        run("ip", "link", "set", link, "up")
    run("ip", "addr", "add", "198.18.0.1/15", "dev", "fwt0")
    run("ip", "-6", "addr", "add", "fd00:5e::1/32", "dev", "fwt0", "nodad")
    return netns


def ip_state(netns: str) -> list[str]:
    """Every ip rule and route of this namespace that names one of our marks or tables."""
    lines = []
    for argv in (
        ["ip", "-4", "rule"],
        ["ip", "-6", "rule"],
        ["ip", "-4", "route", "show", "table", "all"],
        ["ip", "-6", "route", "show", "table", "all"],
    ):
        done = subprocess.run(
            [IP, "netns", "exec", netns, *argv],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        lines += [
            f"{argv[1]} {line.strip()}"
            for line in done.stdout.splitlines()
            if "13972" in line or "0x5348" in line
        ]
    return lines


CLIENT = """\
import asyncio, json, socket, struct, sys
from shuttle_client.firewall_session import FirewallError, FirewallSession, fetch_sockets
from shuttle_protocol.firewall_messages import SocketsAnswer, SocketsRequest

IP_ORIGDSTADDR, IPV6_ORIGDSTADDR = 20, 74


def say(**fields):
    print(json.dumps(fields), flush=True)


def original_destination(ancillary):
    for level, kind, data in ancillary:
        port = struct.unpack_from("!H", data, 2)[0]  # after sin_family / sin6_family
        if (level, kind) == (socket.IPPROTO_IP, IP_ORIGDSTADDR):  # struct sockaddr_in
            return socket.inet_ntop(socket.AF_INET, data[4:8]), port
        if (level, kind) == (socket.IPPROTO_IPV6, IPV6_ORIGDSTADDR):  # struct sockaddr_in6
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    return None


async def main():
    client = FirewallSession(sys.argv[1])
    try:
        method = await client.open(
            "tproxy", 1, ["198.18.0.0/15", "fd00:5e::/32"], [("198.18.0.99/32", 1, 65535)]
        )
        token = await client._request(SocketsRequest(client.session), SocketsAnswer, 5)
        say(method=method, session=client.session, token=token.token, path=token.path)
        sys.stdin.readline()  # someone else tries the token meanwhile
        try:
            await fetch_sockets(token.path, token.token, 5)
            spent = "fetched"
        except FirewallError as exc:
            spent = str(exc)
        port, sockets = await client.tproxy_sockets()
        results = {"spent": spent, "port": port, "kinds": sorted(sockets)}
        results["bound"] = sorted(list(sock.getsockname()[:2]) for sock in sockets.values())
        for version, destination in ((4, ("198.18.0.5", 80)), (6, ("fd00:5e::5", 443))):
            with socket.create_connection(destination, timeout=5) as connection:
                sockets[f"tcp{version}"].settimeout(5)
                accepted, peer = sockets[f"tcp{version}"].accept()
                with accepted:
                    results[f"tcp{version}"] = {
                        "local": accepted.getsockname()[:2],
                        "peer is the connection": peer[:2] == connection.getsockname()[:2],
                    }
        for version, destination in ((4, ("198.18.0.5", 53)), (6, ("fd00:5e::5", 5353))):
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            with socket.socket(family, socket.SOCK_DGRAM) as sender:
                sender.settimeout(5)
                sender.sendto(b"ping", destination)
                receiver = sockets[f"udp{version}"]
                receiver.settimeout(5)
                data, ancillary, _, source = receiver.recvmsg(2048, socket.CMSG_SPACE(64))
                original = original_destination(ancillary)
                with await client.reply_socket(*original, source[:2]) as reply:
                    reply.sendto(b"pong", source)
                answer, replier = sender.recvfrom(2048)
                results[f"udp{version}"] = {
                    "data": data.decode(),
                    "original": original,
                    "source": source[0],
                    "source port is the sender's": source[1] == sender.getsockname()[1],
                    "answer": answer.decode(),
                    "from": replier[:2],
                }
        refused = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as program:
            program.bind(("0.0.0.0", 0))
            mine = ("198.18.0.1", program.getsockname()[1])
            for address, port, sender in (
                ("192.0.2.1", 53, mine),
                ("198.18.0.99", 53, mine),
                ("198.18.0.1", 53, mine),
                ("198.19.255.255", 53, mine),
                ("198.18.0.0", 53, mine),
                ("198.18.0.5", 53, ("198.18.0.1", 1)),
                ("198.18.0.5", 53, ("198.18.0.2", mine[1])),
            ):
                try:
                    (await client.reply_socket(address, port, sender)).close()
                    refused.append("made")
                except FirewallError as exc:
                    refused.append(str(exc).replace(str(mine[1]), "P"))
        results["refused"] = refused
        for sock in sockets.values():
            sock.close()
        say(**results)
    finally:
        await client.close()


asyncio.run(main())
"""

THIEF = """\
import asyncio, sys
from shuttle_client.firewall_session import FirewallError, fetch_sockets
try:
    asyncio.run(fetch_sockets(sys.argv[1], sys.argv[2], 5))
    print("fetched")
except FirewallError as exc:
    print(exc)
"""
THIEF_UID = 65533  # not nobody; in nobody's group, which may use the sockets


def in_netns(netns: str, user: list[str], script: str, *args: str) -> list[str]:
    return [IP, "netns", "exec", netns, *user, sys.executable, "-c", script, *args]


@pytest.mark.integration
def test_a_client_of_another_uid_gets_working_transparent_sockets(
    tproxy_net: str, start_firewalld: Callable[..., Daemon]
) -> None:
    netns = tproxy_net
    daemon = start_firewalld(group="nogroup", lease=30)
    client = subprocess.Popen(
        in_netns(netns, NOBODY, CLIENT, str(daemon.socket_path)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    try:
        first = client.stdout.readline()
        assert first, client.communicate(timeout=WAIT)
        opened: dict[str, Any] = json.loads(first)
        assert opened["method"] == "tproxy"
        assert opened["path"] == f"{daemon.socket_path}.fds"
        short = opened["session"][:12]
        # In force: the table, and a rule and a route per IP version.
        assert shuttle_tables(netns) == [f"shuttle-{short}"]
        assert ip_state(netns) == [
            "-4 32765:\tfrom all fwmark 0x53480001 lookup 1397227521",
            "-6 32765:\tfrom all fwmark 0x53480001 lookup 1397227521",
            "-4 local default dev lo table 1397227521 scope host",
            "-6 local default dev lo table 1397227521 metric 1024 pref medium",
        ]
        # Another uid with the token gets nothing (SO_PEERCRED), and spends it.
        thief = subprocess.run(
            in_netns(
                netns,
                [f"--reuid={THIEF_UID}" if arg.startswith("--reuid") else arg for arg in NOBODY],
                THIEF,
                opened["path"],
                opened["token"],
            ),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert thief.stdout.startswith("shuttle-firewalld refused to hand the sockets over")
        daemon.wait_for_line(f"shuttle-firewalld: fd socket: refused uid {THIEF_UID} (pid ")
        assert f"token of session {short}, which is uid 65534's" in daemon.log
        client.stdin.write("go on\n")
        client.stdin.flush()
        results: dict[str, Any] = json.loads(client.stdout.readline() or "{}")
        assert client.wait(WAIT) == 0, client.stderr.read() if client.stderr else ""
    finally:
        if client.poll() is None:
            client.kill()
        client.communicate(timeout=WAIT)
    assert results["spent"].startswith("shuttle-firewalld refused to hand the sockets over")
    port = results["port"]
    assert results["kinds"] == ["tcp4", "tcp6", "udp4", "udp6"]
    assert results["bound"] == [["127.0.0.1", port]] * 2 + [["::1", port]] * 2
    # TPROXY keeps the original destination: it is the accepted socket's own address.
    assert results["tcp4"] == {"local": ["198.18.0.5", 80], "peer is the connection": True}
    assert results["tcp6"] == {"local": ["fd00:5e::5", 443], "peer is the connection": True}
    for version, address, udp_port, source in (
        (4, "198.18.0.5", 53, "198.18.0.1"),
        (6, "fd00:5e::5", 5353, "fd00:5e::1"),
    ):
        assert results[f"udp{version}"] == {
            "data": "ping",
            "original": [address, udp_port],
            "source": source,
            "source port is the sender's": True,
            "answer": "pong",
            "from": [address, udp_port],  # the reply left from the original destination
        }
    assert results["refused"] == [
        "shuttle-firewalld: 192.0.2.1:53 is not inside the session's subnets (or is excluded)",
        "shuttle-firewalld: 198.18.0.99:53 is not inside the session's subnets (or is excluded)",
        "shuttle-firewalld: 198.18.0.1:53 is this host's own address, which is never captured",
        "shuttle-firewalld: 198.19.255.255:53 is a broadcast address, not one a reply may come "
        "from",
        "shuttle-firewalld: 198.18.0.0:53 is the network address of 198.18.0.0/15, a subnet of "
        "this host",
        # No program there, nor at an address that is not this host's.
        "shuttle-firewalld: no UDP socket takes datagrams at 198.18.0.1:1, where the flow's "
        "program would be",
        "shuttle-firewalld: the program at 198.18.0.2:P has no address of this host",
    ]
    # The client closed the session: nothing of it is left.
    assert shuttle_tables(netns) == []
    assert ip_state(netns) == []
    assert (
        f"session {short} of uid 65534 closed by uid 65534: 23 tproxy rules removed" in daemon.log
    )


@pytest.mark.integration
def test_stale_rules_and_routes_go_at_start_and_only_they(
    netns: str, start_firewalld: Callable[..., Daemon]
) -> None:
    def run(*argv: str) -> None:
        subprocess.run([IP, "netns", "exec", netns, *argv], check=True, timeout=10)

    for version, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
        # A crashed run's session in slot 5 ...
        run("ip", version, "rule", "add", "fwmark", "0x53480005", "lookup", "1397227525")
        run("ip", version, "route", "add", "local", default, "dev", "lo", "table", "1397227525")
        # ... and someone else's, which stay.
        run("ip", version, "rule", "add", "fwmark", "0x1", "lookup", "100")
        run("ip", version, "route", "add", "local", default, "dev", "lo", "table", "100")
    nft(netns, "add", "table", "inet", "shuttle-aaaaaaaaaaaa")
    daemon = start_firewalld()
    assert ip_state(netns) == []
    assert shuttle_tables(netns) == []
    assert "removed 1 stale IPv4 fwmark rules and the routes of 1 stale tables" in daemon.log
    assert "removed 1 stale IPv6 fwmark rules and the routes of 1 stale tables" in daemon.log
    for version in ("-4", "-6"):
        rules = subprocess.run(
            [IP, "netns", "exec", netns, "ip", version, "rule"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        assert "fwmark 0x1 lookup 100" in rules
        routes = subprocess.run(
            [IP, "netns", "exec", netns, "ip", version, "route", "show", "table", "100"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        assert routes.startswith("local default dev lo")
    assert "the tproxy method does not work here" not in daemon.log


def original_destination(ancillary: list[tuple[int, int, bytes]]) -> tuple[str, int]:
    """The original destination in a datagram's IP_ORIGDSTADDR / IPV6_ORIGDSTADDR data."""
    for level, kind, data in ancillary:
        port = int.from_bytes(data[2:4], "big")  # after sin_family / sin6_family
        if (level, kind) == (socket.IPPROTO_IP, IP_RECVORIGDSTADDR):  # struct sockaddr_in
            return socket.inet_ntop(socket.AF_INET, data[4:8]), port
        if (level, kind) == (socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR):  # sockaddr_in6
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    raise AssertionError(f"no original destination in {ancillary}")


def nothing_waits(sockets: dict[str, socket.socket]) -> bool:
    """Whether no connection and no datagram waits on any of the transparent sockets."""
    for kind, sock in sockets.items():
        sock.setblocking(False)
        try:
            if kind.startswith("tcp"):
                sock.accept()[0].close()
            else:
                sock.recv(2048)
        except BlockingIOError:
            continue
        return False
    return True


@pytest.mark.integration
def test_dns_to_the_nameservers_is_diverted_with_its_original_destination(
    dns_net: str, start_firewalld: Callable[..., Daemon]
) -> None:
    netns = dns_net
    daemon = start_firewalld(lease=30)
    # The nameservers' network is excluded: port 53 of a nameserver is captured all the same.
    args = ("tproxy", 1, [("198.18.0.0/15", 1, 65535)], [("10.53.0.0/24", 1, 65535)])
    # A nameserver on this host, loopback or an interface's address, is refused.
    for local in ("127.0.0.53", "10.53.0.1"):
        with pytest.raises(FirewallError) as refused:
            open_session(daemon, *args, dns=[local])
        assert str(refused.value) == (
            f"shuttle-firewalld: the tproxy method cannot capture DNS to {local}, an address of "
            "this host: its answers would need a socket there on port 53, where other users' "
            "queries could reach it; use --ns-hosts with a nameserver that is not on this host "
            "(not loopback), or the nft or nat method"
        )
    assert (shuttle_tables(netns), ip_state(netns)) == ([], [])
    probes = []
    for nameserver, other in zip(NAMESERVERS, ("10.53.0.54", "fd00:53::54")):
        probes += [(nameserver, 53), (nameserver, 54), (other, 53)]
    client, _ = open_session(daemon, *args, dns=list(NAMESERVERS))
    try:
        _, sockets = asyncio.run(client.tproxy_sockets())
        try:
            for sock in sockets.values():
                sock.settimeout(WAIT)
            # TCP: the captured connections wait in the listeners' backlogs.
            assert connect(netns, probes) == ["connected", "refused", "refused"] * 2
            accepted = []
            for version in (4, 6):
                connection, _ = sockets[f"tcp{version}"].accept()
                with connection:
                    accepted.append(connection.getsockname()[:2])
            assert accepted == [("10.53.0.53", 53), ("fd00:53::53", 53)]
            # UDP: the querier waits for each answer, which we send from a reply socket at
            # the original destination, as the client does.
            querier = subprocess.Popen(query_argv(netns, probes), stdout=subprocess.PIPE, text=True)
            try:
                diverted = []
                for version in (4, 6):
                    data, ancillary, _, source = sockets[f"udp{version}"].recvmsg(
                        2048, socket.CMSG_SPACE(64)
                    )
                    original = original_destination(ancillary)
                    diverted.append((data, original))
                    with asyncio.run(client.reply_socket(*original, source[:2])) as reply:
                        reply.sendto(b"echo " + data, source)
                answers, _ = querier.communicate(timeout=60)
            finally:
                if querier.poll() is None:
                    querier.kill()
                    querier.communicate(timeout=WAIT)
            assert json.loads(answers) == ["echo query", "blocked", "blocked"] * 2
            assert diverted == [(b"query", ("10.53.0.53", 53)), (b"query", ("fd00:53::53", 53))]
            # Nothing else came in: every probe was answered or blocked already.
            assert nothing_waits(sockets)
            # A reply socket at a nameserver's port 53 only.
            with pytest.raises(FirewallError, match=r"10\.53\.0\.53:54 is not inside the sess"):
                asyncio.run(client.reply_socket("10.53.0.53", 54, ("10.53.0.1", 1)))
        finally:
            for sock in sockets.values():
                sock.close()
    finally:
        close_session(client)
    assert (shuttle_tables(netns), ip_state(netns)) == ([], [])
    assert query(netns, probes) == ["blocked"] * len(probes)
    assert connect(netns, probes) == ["refused"] * len(probes)


@pytest.mark.integration
def test_an_update_diverts_the_new_targets_to_the_same_sockets(
    tproxy_net: str, start_firewalld: Callable[..., Daemon]
) -> None:
    netns = tproxy_net
    daemon = start_firewalld(lease=30)
    subnets = [("198.18.0.0/15", 80, 80), ("fd00:5e::/32", 80, 80)]
    client, _ = open_session(daemon, "tproxy", 1, subnets, [])
    try:
        assert client.session is not None
        table = "shuttle-" + client.session[:12]
        routes = ip_state(netns)
        assert len(routes) == 4
        _, sockets = asyncio.run(client.tproxy_sockets())
        try:
            # IPv4 port 443 only: IPv6 leaves the table, its sockets, rule and route stay.
            assert update_session(client, [("198.18.0.0/15", 443, 443)], []) == 13 + 4
            assert nft_set_sizes(netns, table) == {
                "exclude4": 0,
                "include4": 1,
                "flows4": 0,
                "flows6": 0,
            }
            assert "198.18.0.0/15 . 443" in nft(netns, "list", "set", "inet", table, "include4")
            assert ip_state(netns) == routes
            # And comes back, on port 443: the sockets the client has take it.
            subnets = [("198.18.0.0/15", 443, 443), ("fd00:5e::/32", 443, 443)]
            assert update_session(client, subnets, []) == 19 + 4
            assert connect(netns, [("198.18.0.5", 443), ("fd00:5e::5", 443)]) == ["connected"] * 2
            accepted = []
            for version in (4, 6):
                sockets[f"tcp{version}"].settimeout(WAIT)
                connection, _ = sockets[f"tcp{version}"].accept()
                with connection:
                    accepted.append(connection.getsockname()[:2])
            assert accepted == [("198.18.0.5", 443), ("fd00:5e::5", 443)]
        finally:
            for sock in sockets.values():
                sock.close()
    finally:
        close_session(client)
    assert (shuttle_tables(netns), ip_state(netns)) == ([], [])


@pytest.mark.integration
def test_an_update_to_an_ip_version_without_sockets_is_refused(
    tproxy_net: str, start_firewalld: Callable[..., Daemon]
) -> None:
    netns = tproxy_net
    daemon = start_firewalld(lease=30)
    client, _ = open_session(daemon, "tproxy", 1, [("198.18.0.0/15", 1, 65535)], [])
    try:
        assert client.session is not None
        table = "shuttle-" + client.session[:12]
        before = nft(netns, "list", "table", "inet", table)
        with pytest.raises(FirewallError) as refused:
            update_session(client, [("198.18.0.0/15", 1, 65535), ("fd00:5e::/32", 1, 65535)], [])
        assert str(refused.value) == (
            "shuttle-firewalld: this tproxy session has no IPv6 sockets (it was opened without "
            "IPv6 subnets): capturing IPv6 needs a new session"
        )
        assert nft(netns, "list", "table", "inet", table) == before
    finally:
        close_session(client)
    assert (shuttle_tables(netns), ip_state(netns)) == ([], [])


# --- a second member's reply sockets: no spoofing, no stealing ------------------------------

# The victim (uid 65534): a program's socket, and the victim's own client on its session,
# which answers each captured datagram from a reply socket, as shuttle-client does. On each
# line of stdin the program sends one datagram to 198.18.0.5:5000 and prints every datagram
# it gets back.
VICTIM = """\
import asyncio, json, select, socket, sys
from shuttle_client.firewall_session import FirewallSession

IP_ORIGDSTADDR = 20


async def main():
    client = FirewallSession(sys.argv[1])
    await client.open("tproxy", 1, ["198.18.0.0/15"], [])
    _, sockets = await client.tproxy_sockets()
    captured = sockets["udp4"]
    captured.settimeout(5)
    program = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    program.bind(("0.0.0.0", 0))
    print(json.dumps({"port": program.getsockname()[1]}), flush=True)
    replies = {}
    for line in sys.stdin:
        program.sendto(line.strip().encode(), ("198.18.0.5", 5000))
        try:
            data, ancillary, _, source = captured.recvmsg(2048, socket.CMSG_SPACE(64))
        except TimeoutError:  # someone else's socket took it
            print(json.dumps("lost"), flush=True)
            continue
        port = int.from_bytes(ancillary[0][2][2:4], "big")
        original = (socket.inet_ntoa(ancillary[0][2][4:8]), port)
        if original not in replies:
            replies[original] = await client.reply_socket(*original, source[:2])
        replies[original].sendto(b"echo " + data, source)
        got = []
        while select.select([program], [], [], 1.0)[0]:  # until nothing came for a second
            answer, sender = program.recvfrom(2048)
            got.append([answer.decode(), list(sender)])
        print(json.dumps(got), flush=True)
    await client.close()


asyncio.run(main())
"""

# Another member: in nobody's group, which may use firewalld here; testbed/reply_attacker.py.
ATTACKER_UID = ["setpriv", "--reuid=65533", "--regid=65534", "--clear-groups"]


@pytest.fixture
def outside(tproxy_net: str) -> Iterator[str]:
    """The other end of tproxy_net's veth pair in a namespace of its own, the outside host
    198.18.0.7 and fd00:5e::7: whatever it receives left the first namespace."""
    name = tproxy_net + "-out"

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, timeout=10)

    run(IP, "netns", "add", name)
    try:
        run(IP, "-n", tproxy_net, "link", "set", "fwt1", "netns", name)
        run(IP, "-n", name, "link", "set", "fwt1", "up")
        run(IP, "-n", name, "addr", "add", "198.18.0.7/15", "dev", "fwt1")
        run(IP, "-n", name, "-6", "addr", "add", "fd00:5e::7/32", "dev", "fwt1", "nodad")
        yield name
    finally:
        subprocess.run([IP, "netns", "del", name], check=False, timeout=10)


# The outside host: a socket per family on port 7; it prints what arrived when told to stop.
OUTSIDE = """\
import json, select, socket, sys
sockets = [socket.socket(family, socket.SOCK_DGRAM) for family in (socket.AF_INET, socket.AF_INET6)]
sockets[0].bind(("198.18.0.7", 7))
sockets[1].bind(("fd00:5e::7", 7))
print("listening", flush=True)
got = []
for _ in range(100):
    ready = select.select([*sockets, sys.stdin], [], [], 30)[0]
    if not ready or sys.stdin in ready:
        break
    for sock in ready:
        got.append(list(sock.recvfrom(100)[1][:2]))
print(json.dumps(got), flush=True)
"""


@pytest.mark.integration
def test_a_second_member_can_neither_spoof_nor_steal_with_reply_sockets(
    tproxy_net: str, outside: str, start_firewalld: Callable[..., Daemon]
) -> None:
    netns = tproxy_net
    daemon = start_firewalld(group="nogroup", lease=30)
    path = str(daemon.socket_path)
    victim = Dialogue(in_netns(netns, NOBODY, VICTIM, path))
    processes = [victim]
    try:
        victims_port = json.loads(victim.line())["port"]
        victim.tell("first")  # the victim's flow works before the attack
        before = json.loads(victim.line())
        receiver = Dialogue([IP, "netns", "exec", outside, sys.executable, "-c", OUTSIDE])
        processes.append(receiver)
        assert receiver.line() == "listening\n"
        attack = {
            "socket": path,
            "victim_uid": 65534,
            "program": "198.18.0.1",
            "program6": "fd00:5e::1",
            "destination": "198.18.0.5",
            "port": 5000,
            "broadcast": "198.19.255.255",
            "network": "198.18.0.0",
            "network6": "fd00:5e::",
            "spoofed": "198.18.0.99",
            "spoofed6": "fd00:5e::99",
            "outside": "198.18.0.7",
            "outside6": "fd00:5e::7",
        }
        argv = [sys.executable, reply_attacker.__file__, json.dumps(attack)]
        attacker = Dialogue([IP, "netns", "exec", netns, *ATTACKER_UID, *argv])
        processes.append(attacker)
        assert attacker.line() == "ready\n"
        victim.tell("second")  # and during it
        during = json.loads(victim.line())
        attacker.tell("go on")
        results = json.loads(attacker.line())
        receiver.tell("stop")
        reached_outside = json.loads(receiver.line())
        victim.tell("third")  # and after it
        after = json.loads(victim.line())
    finally:
        for process in processes:
            process.close()
    echo = [f"echo {word}" for word in ("first", "second", "third")]
    # The victim's flow: each datagram answered once, from its destination, and nothing else.
    assert [before, during, after] == [[[text, ["198.18.0.5", 5000]]] for text in echo]
    assert results["victims flow"] == (
        f"shuttle-firewalld: the program's socket at 198.18.0.1:{victims_port} is uid 65534's, "
        "whose traffic this session does not capture (only uid 65533's)"
    )
    assert results["broadcast"] == (
        "shuttle-firewalld: 198.19.255.255:53 is a broadcast address, not one a reply may come from"
    )
    assert results["network"] == (
        "shuttle-firewalld: 198.18.0.0:53 is the network address of 198.18.0.0/15, a subnet of "
        "this host"
    )
    assert results["network6"] == (
        "shuttle-firewalld: [fd00:5e::]:53 is the network address of fd00:5e::/32, a subnet of "
        "this host"
    )
    # nft drops what is not a reply to its own flow (the socket hears EPERM), and nothing
    # reached the outside host; its own programs got theirs, from the flows' destinations.
    refused = "Operation not permitted"
    assert results["sent"] == {
        "outside": refused,
        "victim": refused,
        "outside6": refused,
        "own": "sent",
        "own6": "sent",
    }
    assert results["own"] == [["198.18.0.99", 53], ["fd00:5e::99", 53]]
    assert reached_outside == []
    # Connected to the victim's program, it neither reaches it nor takes its datagrams, and
    # the client can take none of the fences off.
    assert results["hijack"] == refused
    assert results["stolen"] == "timed out"
    assert results["fences"] == [refused] * 3

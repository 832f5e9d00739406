"""GetRoutes: parsing /proc/net/route and /proc/net/ipv6_route, and the agent's answer, from a
namespace whose routes the test sets."""

import logging
import sys
from pathlib import Path
from typing import List

import pytest
from shuttle_agent.main import EXIT_PROTOCOL
from shuttle_agent.routes import (
    parse_ipv4_routes,
    parse_ipv6_routes,
    read_routes,
    routes_answer,
)
from shuttle_protocol.stream_messages import MAX_LIST, Error, GetRoutes, Ping, Pong, Routes

from .agent_process import PYTHONS, AgentProcess, Namespace, StartAgent, welcomed

# As Linux writes it on a little-endian machine (tabs, and blanks padding the lines).
PROC_NET_ROUTE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT   \t
eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0                   \t
eth0\t000200C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0                   \t
eth0\t0000140A\tFE0200C0\t0003\t0\t0\t0\t0000FFFF\t0\t0\t0                   \t
eth1\t07001E0A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0                   \t
eth1\t000200C0\t00000000\t0001\t0\t0\t200\t00FFFFFF\t0\t0\t0                   \t
*\t0000280A\t00000000\t0201\t0\t0\t0\t0000FFFF\t0\t0\t0                   \t
*\t0000320A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0                   \t
eth0\t0000460A\t00000000\t0000\t0\t0\t0\t0000FFFF\t0\t0\t0                   \t
"""
IPV4_NETWORKS = ["0.0.0.0/0", "192.0.2.0/24", "10.20.0.0/16", "10.30.0.7/32", "192.0.2.0/24"]

# Every table: main, then local (::1, the machine's own addresses, multicast), with the
# kernel's null entries (::/0 on lo, rejecting) and an unreachable route.
PROC_NET_IPV6_ROUTE = """\
20010db8000900000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001       v0
20010db8000000000000000000000000 30 00000000000000000000000000000000 00 20010db8000900000000000000000002 00000400 00000001 00000000 00000003       v0
20010db8006000000000000000000000 30 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00200200       lo
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001       v1
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001       v0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 20010db8000900000000000000000001 00000400 00000002 00000000 00000003       v0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001       lo
20010db8000900000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       v0
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001       v1
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001       v0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
"""  # noqa: E501 (the kernel's own line length)
IPV6_NETWORKS = [
    "2001:db8:9::/64",
    "2001:db8::/48",
    "fe80::/64",
    "fe80::/64",
    "::/0",
    "::1/128",
    "2001:db8:9::1/128",
    "ff00::/8",
    "ff00::/8",
]


def test_ipv4_routes_are_read_as_the_kernel_writes_them() -> None:
    assert list(parse_ipv4_routes(PROC_NET_ROUTE.splitlines(), "little")) == IPV4_NETWORKS


def test_ipv4_routes_that_deliver_nothing_are_left_out() -> None:
    networks = list(parse_ipv4_routes(PROC_NET_ROUTE.splitlines(), "little"))
    assert "10.40.0.0/16" not in networks  # unreachable: RTF_REJECT
    assert "10.50.0.0/16" not in networks  # blackhole: no device
    assert "10.70.0.0/16" not in networks  # not up


def test_direct_leaves_out_the_routes_through_a_gateway() -> None:
    # The client's question about its own host: the networks on its links.
    assert list(parse_ipv4_routes(PROC_NET_ROUTE.splitlines(), "little", direct=True)) == [
        "192.0.2.0/24",
        "10.30.0.7/32",
        "192.0.2.0/24",
    ]
    assert list(parse_ipv6_routes(PROC_NET_IPV6_ROUTE.splitlines(), direct=True)) == [
        "2001:db8:9::/64",
        "fe80::/64",
        "fe80::/64",
        "::1/128",
        "2001:db8:9::1/128",
        "ff00::/8",
        "ff00::/8",
    ]


def test_a_big_endian_machine_writes_the_bytes_the_other_way() -> None:
    text = "eth0\tC0000200\t00000000\t0001\t0\t0\t0\tFFFFFF00\t0\t0\t0\n"
    assert list(parse_ipv4_routes([text], "big")) == ["192.0.2.0/24"]


@pytest.mark.parametrize(
    "line",
    [
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0",  # too few fields
        "eth0\t000200G0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0",  # not hex
        "eth0\t0200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0",  # too short
        "eth0\t0x0200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0",  # int() would take it
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FF00FF\t0\t0\t0",  # mask not contiguous
        "eth0\t010200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0",  # host bits set
        "eth0\t000200C0\t00000000\tUP\t0\t0\t0\t00FFFFFF\t0\t0\t0",  # flags not hex
        "eth0\t000200C0\t00000000\t-1\t0\t0\t0\t00FFFFFF\t0\t0\t0",
        "",
        "\x00\xff garbage",
    ],
)
def test_malformed_ipv4_lines_are_skipped(line: str) -> None:
    good = "eth0\t0000140A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0"
    assert list(parse_ipv4_routes([line, good], "little")) == ["10.20.0.0/16"]


def test_ipv6_routes_of_every_table_are_read_as_the_kernel_writes_them() -> None:
    assert list(parse_ipv6_routes(PROC_NET_IPV6_ROUTE.splitlines())) == IPV6_NETWORKS


ZEROS = "0" * 32


@pytest.mark.parametrize(
    "line",
    [
        f"20010db8 30 {ZEROS} 00 {ZEROS} 00000400 00000001 00000000 00000001 v0",  # short
        f"20010db8{'0' * 24} 81 {ZEROS} 00 {ZEROS} 00000400 00000001 00000000 00000001 v0",
        f"20010db8{'0' * 24} 3 {ZEROS} 00 {ZEROS} 00000400 00000001 00000000 00000001 v0",
        f"20010db8{'0' * 23}1 30 {ZEROS} 00 {ZEROS} 00000400 00000001 00000000 00000001 v0",
        f"20010db8{'0' * 24} 30 {ZEROS} 00 {ZEROS} 00000400 00000001 00000000 0000000z v0",
        f"20010db8{'0' * 24} 30 {ZEROS} 00 {ZEROS} 00000400 00000001 00000000 00000001",
        f"20010db8{'0' * 24} 30 {ZEROS} 00 {ZEROS} 00000400 00000001 00000000 00000001 v0 x",
        f"20010db8{'0' * 24} 30 {ZEROS} 00 {ZEROS} 00000400 00000001 00000000 000000001 v0",
        # IPv4-mapped: never IPv6 on the wire, and its text differs between Pythons.
        f"{'0' * 20}ffff{'0' * 8} 60 {ZEROS} 00 {ZEROS} 00000400 00000001 00000000 00000001 v0",
        "garbage",
    ],
)
def test_malformed_ipv6_lines_are_skipped(line: str) -> None:
    good = f"fd00{'0' * 28} 08 {ZEROS} 00 {ZEROS} 00000100 00000001 00000000 00000001 v0"
    assert list(parse_ipv6_routes([line, good])) == ["fd00::/8"]


def write_tables(tmp_path: Path) -> "tuple[str, str]":
    route, ipv6_route = tmp_path / "route", tmp_path / "ipv6_route"
    route.write_text(PROC_NET_ROUTE)
    ipv6_route.write_text(PROC_NET_IPV6_ROUTE)
    return str(route), str(ipv6_route)


@pytest.mark.skipif(sys.byteorder != "little", reason="the fixture is little-endian")
def test_both_tables_are_read_each_network_once(tmp_path: Path) -> None:
    networks = read_routes(*write_tables(tmp_path))
    assert networks == list(dict.fromkeys(IPV4_NETWORKS + IPV6_NETWORKS))


def test_a_table_that_cannot_be_read_is_logged_and_the_other_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, ipv6_route = write_tables(tmp_path)
    with caplog.at_level(logging.INFO, logger="shuttle"):
        networks = read_routes(str(tmp_path / "missing"), ipv6_route)
    assert networks == list(dict.fromkeys(IPV6_NETWORKS))
    assert "cannot read the routes in" in caplog.text


def test_no_tables_at_all_is_no_routes(tmp_path: Path) -> None:
    assert read_routes(str(tmp_path / "a"), str(tmp_path / "b")) == []
    assert routes_answer([]) == [Routes((), False)]


def test_the_count_is_capped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="shuttle"):
        networks = read_routes(*write_tables(tmp_path), limit=3)
    assert len(networks) == 3
    assert "more than 3 routes" in caplog.text


def test_an_answer_is_split_into_messages_of_max_list() -> None:
    networks = [f"10.{i // 256}.{i % 256}.0/24" for i in range(2 * MAX_LIST + 1)]
    answer = routes_answer(networks)
    assert [len(msg.networks) for msg in answer] == [MAX_LIST, MAX_LIST, 1]
    assert [msg.more for msg in answer] == [True, True, False]
    assert [n for msg in answer for n in msg.networks] == networks


# -- the agent ----------------------------------------------------------------------------


def get_routes(agent: AgentProcess) -> List[Routes]:
    """The messages of one answer to GetRoutes, the last one's `more` false."""
    agent.send(GetRoutes())
    answer: List[Routes] = []
    while not answer or answer[-1].more:
        msg = agent.receive()
        assert isinstance(msg, Routes)
        answer.append(msg)
        assert len(answer) <= 100
    return answer


def test_the_agent_reports_the_routes_of_this_machine(agent: AgentProcess) -> None:
    networks = [n for msg in get_routes(welcomed(agent)) for n in msg.networks]
    assert networks == read_routes()
    assert agent.finish()[0] == 0


ADDED = [
    ("route", "add", "default", "via", "10.9.0.254"),
    ("route", "add", "10.20.0.0/16", "via", "10.9.0.2"),
    ("route", "add", "10.30.0.7/32", "dev", "v0"),
    ("route", "add", "10.30.0.0/24", "via", "10.9.0.3", "metric", "5"),
    ("route", "add", "10.30.0.0/24", "via", "10.9.0.4", "metric", "10"),  # the same network
    ("-6", "route", "add", "default", "via", "2001:db8:9::fe"),
    ("-6", "route", "add", "2001:db8:77::/48", "via", "2001:db8:9::2"),
]
EXPECTED = [
    "0.0.0.0/0",
    "10.9.0.0/24",
    "10.20.0.0/16",
    "10.30.0.7/32",
    "10.30.0.0/24",
    "::/0",
    "2001:db8:9::/64",
    "2001:db8:77::/48",
    "fe80::/64",
    "::1/128",  # the local table: loopback, our own address, multicast
    "2001:db8:9::1/128",
    "ff00::/8",
]
REJECTING = [
    ("route", "add", "unreachable", "10.40.0.0/16"),
    ("route", "add", "blackhole", "10.50.0.0/16"),
    ("route", "add", "prohibit", "10.60.0.0/16"),
    ("-6", "route", "add", "unreachable", "2001:db8:40::/48"),
    ("-6", "route", "add", "blackhole", "2001:db8:50::/48"),
]
REJECTED = ["10.40.0.0/16", "10.50.0.0/16", "10.60.0.0/16", "2001:db8:40::/48", "2001:db8:50::/48"]


@pytest.mark.parametrize("python", PYTHONS)
def test_the_agent_reports_the_routes_the_test_set(
    netns: Namespace, start_agent: StartAgent, python: str
) -> None:
    for command in ADDED + REJECTING:
        netns.ip(*command)
    agent = welcomed(start_agent(python, netns.wrapper))
    answer = get_routes(agent)
    networks = [n for msg in answer for n in msg.networks]
    assert set(EXPECTED) <= set(networks)
    assert not set(REJECTED) & set(networks)
    assert len(networks) == len(set(networks))
    # Whatever else this kernel has (anycast routes, say), it is what its files say.
    tables = netns.read("/proc/net/route").splitlines(), netns.read("/proc/net/ipv6_route")
    direct = [*parse_ipv4_routes(tables[0]), *parse_ipv6_routes(tables[1].splitlines())]
    assert networks == list(dict.fromkeys(direct))
    status, stderr = agent.finish()
    assert status == 0, stderr


def test_many_routes_come_in_several_messages(netns: Namespace, start_agent: StartAgent) -> None:
    added = [f"10.{100 + i // 256}.{i % 256}.0/24" for i in range(2 * MAX_LIST + 50)]
    netns.ip("-batch", "-", stdin="".join(f"route add {n} dev v0\n" for n in added))
    agent = welcomed(start_agent(wrapper=netns.wrapper))
    answer = get_routes(agent)
    assert len(answer) >= 3
    assert all(len(msg.networks) == MAX_LIST for msg in answer[:-1])
    assert set(added) <= {n for msg in answer for n in msg.networks}
    agent.send(Ping(1))
    assert agent.receive() == Pong(1)  # and the session goes on
    assert get_routes(agent) == answer  # asked again, answered again


def test_routes_from_the_client_end_the_session(agent: AgentProcess) -> None:
    welcomed(agent).send(Routes(("10.0.0.0/8",), False))
    error = agent.receive()
    assert isinstance(error, Error)
    assert "unexpected Routes from the client" in error.text
    status, stderr = agent.finish()
    assert status == EXIT_PROTOCOL
    assert "Traceback" not in stderr

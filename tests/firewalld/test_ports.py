"""Listening sockets from the kernel's /proc/net/tcp tables, and which of them may take a
session's redirected connections."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

import pytest
from shuttle_firewalld.ports import (
    UDP_TABLES,
    Listener,
    listeners_on,
    parse_address,
    parse_listeners,
    port_problem,
    sockets_on,
)

from .conftest import listening

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:300C 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 121 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 122 1 0000000000000000 100 0 0 10 0
   2: 0100007F:300D 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000  1001        0 123 1 0000000000000000 20 4 30 10 -1
   3: garbage
   4: 0100007F:ZZZZ 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 124 1
   5: 0100007:300C 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 124 1
"""  # noqa: E501

TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:300C 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1002        0 130 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:300C 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1003        0 130 1 0000000000000000 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:300C 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1004        0 130 1 0000000000000000 100 0 0 10 0
"""  # noqa: E501

# Unconnected (state 07) and connected (01) UDP sockets.
UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 0100007F:300C 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 140 2 0000000000000000 0
  101: 0100007F:300D 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000  1001        0 141 2 0000000000000000 0
"""  # noqa: E501

little_endian = pytest.mark.skipif(
    sys.byteorder != "little", reason="the samples are from a little-endian host"
)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@little_endian
def test_parse_address() -> None:
    assert parse_address("0100007F") == ip("127.0.0.1")
    assert parse_address("00000000") == ip("0.0.0.0")
    assert parse_address("00000000000000000000000001000000") == ip("::1")
    assert parse_address("0000000000000000FFFF00000100007F") == ip("::ffff:127.0.0.1")
    assert parse_address("B80D0120000000000000000001000000") == ip("2001:db8::1")
    for bad in ("", "0100007", "0100007G"):
        with pytest.raises(ValueError):
            parse_address(bad)


@little_endian
def test_parse_listeners_takes_listening_sockets_only() -> None:
    # Port 0x300D is connected (state 01), not listening; malformed lines are skipped.
    assert list(parse_listeners(TCP)) == [
        Listener(ip("127.0.0.1"), 0x300C, 1000),
        Listener(ip("0.0.0.0"), 0x16, 0),
    ]


@little_endian
def test_parse_listeners_ipv6() -> None:
    assert list(parse_listeners(TCP6)) == [
        Listener(ip("::1"), 0x300C, 1002),
        Listener(ip("::"), 0x300C, 1003),
        Listener(ip("::ffff:127.0.0.1"), 0x300C, 1004),
    ]


@little_endian
def test_parse_listeners_of_udp_takes_every_socket() -> None:
    assert list(parse_listeners(UDP, "udp")) == [
        Listener(ip("127.0.0.1"), 0x300C, 1000, "udp"),
        Listener(ip("127.0.0.1"), 0x300D, 1001, "udp"),
    ]


def test_parse_listeners_of_an_empty_table() -> None:
    assert list(parse_listeners("")) == []
    assert list(parse_listeners(TCP.splitlines()[0])) == []


@little_endian
def test_listeners_on_reads_both_tables(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text(TCP)
    (tmp_path / "tcp6").write_text(TCP6)
    tables = [str(tmp_path / "tcp"), str(tmp_path / "tcp6"), str(tmp_path / "missing")]
    assert {item.uid for item in listeners_on(0x300C, tables)} == {1000, 1002, 1003, 1004}
    assert listeners_on(0x16, tables) == [Listener(ip("0.0.0.0"), 0x16, 0)]
    assert listeners_on(0x300D, tables) == []


def test_listeners_on_sees_a_real_listener() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        assert listeners_on(port) == []  # bound is not listening yet
        listener.listen()
        assert listeners_on(port) == [Listener(ip("127.0.0.1"), port, os.getuid())]


def test_sockets_on_sees_a_real_udp_socket_beside_the_listeners() -> None:
    with socket.socket() as listener, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.listen()
        assert listeners_on(port, UDP_TABLES, "udp") == []
        udp.bind(("127.0.0.1", port))  # UDP and TCP ports are apart
        assert sockets_on(port) == [
            Listener(ip("127.0.0.1"), port, os.getuid()),
            Listener(ip("127.0.0.1"), port, os.getuid(), "udp"),
        ]


# port_problem: who listens where -> the problem for uid 1000 (None: fine).
NO_V4 = "no listening socket of uid 1000 on port 1 at 127.0.0.1 or a wildcard address, where IPv4 connections land"  # noqa: E501
NO_V6 = "no listening socket of uid 1000 on port 1 at ::1 or a wildcard address, where IPv6 connections land"  # noqa: E501
NO_FWD4 = "no listening socket of uid 1000 on port 1 at a wildcard address, where forwarded IPv4 connections land"  # noqa: E501
NO_FWD6 = "no listening socket of uid 1000 on port 1 at a wildcard address, where forwarded IPv6 connections land"  # noqa: E501
OTHERS4 = "port 1 has listeners of other users too (uid 1001) where IPv4 connections would land"


def mine(*addresses: str) -> list[Listener]:
    return listening(1, 1000, *addresses)


def theirs(*addresses: str) -> list[Listener]:
    return listening(1, 1001, *addresses)


@pytest.mark.parametrize(
    ("listeners", "versions", "forward", "problem"),
    [
        (mine("127.0.0.1"), {4}, False, None),
        (mine("0.0.0.0"), {4}, False, None),
        (mine("::"), {4}, False, None),  # dual-stack
        (mine("::ffff:127.0.0.1"), {4}, False, None),
        (mine("127.0.0.2"), {4}, False, NO_V4),  # REDIRECT goes to 127.0.0.1 exactly
        (mine("10.0.0.1"), {4}, False, NO_V4),
        (mine("::1"), {4}, False, NO_V4),
        (theirs("127.0.0.1"), {4}, False, NO_V4),
        ([], {4}, False, NO_V4),
        (mine("127.0.0.1"), {4, 6}, False, NO_V6),
        (mine("127.0.0.1", "::1"), {4, 6}, False, None),
        (mine("::"), {4, 6}, False, None),
        (mine("::1"), {6}, False, None),
        (mine("::ffff:127.0.0.1"), {6}, False, NO_V6),
        # another uid where our redirected connections could land (beside an IPv6-only ::)
        (mine("::") + theirs("127.0.0.1"), {4}, False, OTHERS4),
        (mine("::") + theirs("0.0.0.0"), {6}, False, None),  # IPv4 only: not in the way
        (mine("127.0.0.1") + theirs("10.0.0.1"), {4}, False, None),  # lands on 127.0.0.1
        # forward: a wildcard address, and nobody else on any address of the version
        (mine("127.0.0.1"), {4}, True, NO_FWD4),
        (mine("0.0.0.0"), {4}, True, None),
        (mine("::"), {4, 6}, True, None),
        (mine("0.0.0.0", "::1"), {4, 6}, True, NO_FWD6),
        (mine("::") + theirs("10.0.0.1"), {4}, True, OTHERS4),
    ],
)
def test_port_problem(
    listeners: list[Listener], versions: set[int], forward: bool, problem: str | None
) -> None:
    assert port_problem(listeners, 1, 1000, versions, forward) == problem


NO_UDP4 = "no UDP socket of uid 1000 on port 1 at 127.0.0.1 or a wildcard address, where IPv4 DNS datagrams land"  # noqa: E501
NO_UDP6 = "no UDP socket of uid 1000 on port 1 at ::1 or a wildcard address, where IPv6 DNS datagrams land"  # noqa: E501
NO_FWD_UDP4 = "no UDP socket of uid 1000 on port 1 at a wildcard address, where forwarded IPv4 DNS datagrams land"  # noqa: E501
OTHERS_UDP6 = (
    "port 1 has UDP sockets of other users too (uid 1001) where IPv6 DNS datagrams would land"
)


def udp(uid: int, *addresses: str) -> list[Listener]:
    return listening(1, uid, *addresses, protocol="udp")


@pytest.mark.parametrize(
    ("sockets", "dns_versions", "forward", "problem"),
    [
        (mine("127.0.0.1"), set(), False, None),  # no nameservers: no UDP needed
        (mine("127.0.0.1"), {4}, False, NO_UDP4),  # a TCP listener is no UDP socket
        (mine("127.0.0.1") + udp(1000, "127.0.0.1"), {4}, False, None),
        (mine("127.0.0.1") + udp(1000, "::"), {4}, False, None),  # dual-stack
        (mine("127.0.0.1") + udp(1001, "127.0.0.1"), {4}, False, NO_UDP4),
        (mine("127.0.0.1") + udp(1000, "127.0.0.1"), {4, 6}, False, NO_UDP6),
        (
            mine("127.0.0.1") + udp(1000, "127.0.0.1", "::1") + udp(1001, "::"),
            {6},
            False,
            OTHERS_UDP6,
        ),
        (mine("0.0.0.0") + udp(1000, "127.0.0.1"), {4}, True, NO_FWD_UDP4),
        (mine("0.0.0.0") + udp(1000, "0.0.0.0"), {4}, True, None),
        (udp(1000, "127.0.0.1"), {4}, False, NO_V4),  # the TCP listener first
    ],
)
def test_port_problem_with_nameservers(
    sockets: list[Listener], dns_versions: set[int], forward: bool, problem: str | None
) -> None:
    assert port_problem(sockets, 1, 1000, {4}, forward, dns_versions=dns_versions) == problem

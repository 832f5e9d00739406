"""Listening sockets from the kernel (sock_diag), and which of them may take a
session's redirected connections."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest
from shuttle_firewalld.ports import Listener, listeners_on, port_problem, sockets_on

from .fakes import listening


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_listeners_on_sees_a_real_listener() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        assert listeners_on(port) == []  # bound is not listening yet
        listener.listen()
        assert listeners_on(port) == [Listener(ip("127.0.0.1"), port, os.getuid())]


@pytest.mark.parametrize("v6only", [True, False])
def test_listeners_on_tells_an_ipv6_only_listener(v6only: bool) -> None:
    with socket.socket(socket.AF_INET6) as listener:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        listener.bind(("::", 0))
        port = listener.getsockname()[1]
        listener.listen()
        assert listeners_on(port) == [Listener(ip("::"), port, os.getuid(), v6only=v6only)]


def test_a_real_ipv6_only_wildcard_listener_takes_no_ipv4_session() -> None:
    """The review's case: the client's own [::]:P listener is IPV6_V6ONLY; an IPv4 session
    into it would leave 0.0.0.0:P free for anyone to bind and take the connections."""
    with socket.socket(socket.AF_INET6) as listener:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind(("::", 0))
        port = listener.getsockname()[1]
        listener.listen()
        uid = os.getuid()
        assert port_problem(sockets_on(port), port, uid, {4}, False) == (
            f"no listening socket of uid {uid} on port {port} at 127.0.0.1 or a wildcard "
            "address, where IPv4 connections land"
        )
        assert port_problem(sockets_on(port), port, uid, {6}, False) is None


def test_sockets_on_sees_a_real_udp_socket_beside_the_listeners() -> None:
    with socket.socket() as listener, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.listen()
        assert listeners_on(port, "udp") == []
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


def mine_v6only(*addresses: str) -> list[Listener]:
    return listening(1, 1000, *addresses, v6only=True)


def theirs(*addresses: str) -> list[Listener]:
    return listening(1, 1001, *addresses)


@pytest.mark.parametrize(
    ("listeners", "versions", "forward", "problem"),
    [
        (mine("127.0.0.1"), {4}, False, None),
        (mine("0.0.0.0"), {4}, False, None),
        (mine("::"), {4}, False, None),  # dual-stack
        (mine_v6only("::"), {4}, False, NO_V4),  # IPv6 only: IPv4 lands on nobody's socket
        (mine_v6only("::"), {6}, False, None),
        (mine_v6only("::"), {4}, True, NO_FWD4),
        (mine_v6only("0.0.0.0", "::"), {4, 6}, True, None),
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
        (
            mine("127.0.0.1") + listening(1, 1000, "::", protocol="udp", v6only=True),
            {4},
            False,
            NO_UDP4,
        ),
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

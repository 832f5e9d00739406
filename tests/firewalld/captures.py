"""Sessions of root's, from this process, and the checks that one captures what it should
(the same for each method)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from shuttle_client.firewall_session import FirewallError, FirewallSession

from .daemon import Daemon, Listener, nothing_of_shuttle
from .traffic import connect, query


def open_session(daemon: Daemon, *args: Any, **kwargs: Any) -> tuple[FirewallSession, str]:
    """A FirewallSession opened with open(*args, **kwargs); (the session, the method applied)."""
    client = FirewallSession(str(daemon.socket_path))
    try:
        method = asyncio.run(client.open(*args, **kwargs))
    except BaseException:
        close_session(client)
        raise
    return client, method


def close_session(client: FirewallSession) -> None:
    asyncio.run(client.close())


def check_capture(netns: str, daemon: Daemon, listen: Callable[..., Listener], method: str) -> None:
    """Real connections in the routed namespace, before, during and after a session of root's
    (nat and nft alike): captured means connected (to our listener), else refused."""
    listen(12300, addresses=("127.0.0.1", "::1"))
    probes = [
        ("198.18.0.5", 80),  # in 198.18.0.0/15 ports 80-90
        ("198.18.0.5", 90),
        ("198.18.0.5", 91),  # port outside the range
        ("198.18.0.99", 80),  # excluded address
        ("198.19.0.7", 85),
        ("fd00:5e::5", 443),  # IPv6, port 443 only
        ("fd00:5e::5", 444),
        ("fd00:5e:1::5", 443),  # excluded IPv6 network
    ]
    captured = ["connected", "connected", "refused", "refused", "connected"]
    captured += ["connected", "refused", "refused"]
    assert connect(netns, probes) == ["refused"] * len(probes)
    client, applied = open_session(
        daemon,
        method,
        12300,
        [("198.18.0.0/15", 80, 90), ("fd00:5e::/32", 443, 443)],
        [("198.18.0.99/32", 1, 65535), ("fd00:5e:1::/48", 1, 65535)],
    )
    try:
        assert applied == method
        assert connect(netns, probes) == captured
        # Another uid's connections are not captured: the session is root's own.
        assert connect(netns, probes[:1], as_nobody=True) == ["refused"]
    finally:
        close_session(client)
    assert connect(netns, probes) == ["refused"] * len(probes)


def check_dns_capture(
    netns: str, daemon: Daemon, listen: Callable[..., Listener], method: str
) -> None:
    """Real DNS queries in the dns_net namespace, over UDP and TCP, before, during and after a
    session of root's with nameservers (nat and nft alike): captured means answered by our
    UDP echo (from the nameserver's address, as the querier's connected socket demands) or
    connected to our TCP listener. The session excludes the nameservers' network: port 53 of
    a nameserver is captured all the same."""
    listen(12300, addresses=("127.0.0.1", "::1"))
    args = (method, 12300, [("198.18.0.0/15", 1, 65535)], [("10.53.0.0/24", 1, 65535)])
    nameservers = ("10.53.0.53", "127.0.0.53", "fd00:53::53")
    with pytest.raises(FirewallError) as refused:  # our UDP socket is not there yet
        open_session(daemon, *args, dns=nameservers)
    assert str(refused.value) == (
        "shuttle-firewalld: no UDP socket of uid 0 on port 12300 at 127.0.0.1 or a wildcard "
        "address, where IPv4 DNS datagrams land"
    )
    listen(12300, addresses=("127.0.0.1", "::1"), protocol="udp")
    # (probe, UDP answer while captured, TCP while captured); not captured, UDP is blocked in
    # dns_net and refused at 127.0.0.53 (nobody there), TCP refused.
    expected = [
        (("10.53.0.53", 53), "echo query", "connected"),
        (("10.53.0.53", 54), "blocked", "refused"),  # another port
        (("10.53.0.54", 53), "blocked", "refused"),  # another address
        (("127.0.0.53", 53), "echo query", "connected"),  # a local stub resolver's address
        (("127.0.0.53", 54), "refused", "refused"),
        (("127.0.0.54", 53), "refused", "refused"),
        (("fd00:53::53", 53), "echo query", "connected"),
        (("fd00:53::53", 54), "blocked", "refused"),
        (("fd00:53::54", 53), "blocked", "refused"),
    ]
    probes = [probe for probe, _, _ in expected]
    uncaptured = ["refused" if host.startswith("127.") else "blocked" for host, _ in probes]
    assert query(netns, probes) == uncaptured
    assert connect(netns, probes) == ["refused"] * len(probes)
    client, applied = open_session(daemon, *args, dns=nameservers)
    try:
        assert applied == method
        assert query(netns, probes) == [answer for _, answer, _ in expected]
        assert connect(netns, probes) == [tcp for _, _, tcp in expected]
        # Another uid's queries are not captured: the session is root's own.
        assert query(netns, probes[:1], as_nobody=True) == ["blocked"]
        assert connect(netns, probes[3:4], as_nobody=True) == ["refused"]
    finally:
        close_session(client)
    assert nothing_of_shuttle(netns)
    assert query(netns, probes) == uncaptured
    assert connect(netns, probes) == ["refused"] * len(probes)


def update_session(client: FirewallSession, *args: Any) -> int:
    """client.update(*args), run to its end: the new rule count."""
    return asyncio.run(client.update(*args))


def check_update(netns: str, daemon: Daemon, listen: Callable[..., Listener], method: str) -> None:
    """Real connections in the routed namespace while a session of root's changes what it
    captures (nat and nft alike): captured means connected, else refused. Our listener is on
    127.0.0.1 only, so an update that would add IPv6 is refused, and changes nothing."""
    listen(12300)
    probes = [("198.18.0.5", 80), ("198.19.0.7", 443), ("198.19.0.99", 443)]
    client, _ = open_session(daemon, method, 12300, [("198.18.0.0/16", 80, 80)], [])
    try:
        assert connect(netns, probes) == ["connected", "refused", "refused"]
        rules = update_session(
            client, [("198.19.0.0/16", 443, 443)], [("198.19.0.99/32", 1, 65535)]
        )
        assert connect(netns, probes) == ["refused", "connected", "refused"]
        with pytest.raises(FirewallError) as refused:
            update_session(client, [("198.18.0.0/16", 80, 80), ("fd00:5e::/32", 1, 65535)], [])
        assert str(refused.value) == (
            "shuttle-firewalld: no listening socket of uid 0 on port 12300 at ::1 or a wildcard "
            "address, where IPv6 connections land"
        )
        assert connect(netns, probes) == ["refused", "connected", "refused"]
        [entry] = asyncio.run(client.list_sessions())
        assert (entry.method, entry.subnets, entry.excludes, entry.rules) == (method, 1, 1, rules)
    finally:
        close_session(client)
    assert nothing_of_shuttle(netns)
    assert connect(netns, probes) == ["refused"] * len(probes)

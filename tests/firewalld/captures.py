"""Sessions of root's, from this process, and the checks that one captures what it should
(the same for each method), shortcuts included."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from shuttle_client.firewall_session import FirewallError, FirewallSession
from shuttle_protocol.firewall_messages import (
    ErrorAnswer,
    SetShortcutsAnswer,
    SetShortcutsRequest,
    Shortcut,
)
from shuttle_protocol.frames import encode_frame

from .daemon import WAIT, Daemon, Listener, ask, nft, nothing_of_shuttle
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


class Landing:
    """Listeners of root's on 127.0.0.1 and ::1 of each port, made by the test's own thread
    (in the test's namespace, as the netns fixture put it), and the connections it makes
    there: which port each one reached. Everything stays open until close(), so that a
    shortcut's limit counts each connection for as long as the check runs."""

    def __init__(self, ports: tuple[int, ...]) -> None:
        self._open: list[socket.socket] = []
        self._by_socket: dict[socket.socket, int] = {}
        for port in ports:
            for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                sock = socket.socket(family, socket.SOCK_STREAM)
                self._open.append(sock)
                sock.bind((address, port))
                sock.listen(16)
                self._by_socket[sock] = port

    def reached(self, host: str, port: int) -> int | str:
        """Connect to (host, port): the port of ours it reached, or why it reached none."""
        try:
            self._open.append(socket.create_connection((host, port), timeout=WAIT))
        except OSError as exc:
            return type(exc).__name__
        readable, _, _ = select.select(list(self._by_socket), [], [], WAIT)
        if not readable:
            return "connected elsewhere"
        accepted, _ = readable[0].accept()
        self._open.append(accepted)
        return self._by_socket[readable[0]]

    def hang_up(self) -> None:
        """Close every connection, both ends; the listeners stay."""
        listeners = list(self._by_socket)
        for sock in self._open:
            if sock not in self._by_socket:
                sock.close()
        self._open = listeners

    def close(self) -> None:
        for sock in self._open:
            sock.close()


def set_shortcuts(
    daemon: Daemon, client: FirewallSession, shortcuts: tuple[Shortcut, ...], limit: int
) -> int | str:
    """SetShortcuts for the client's session, as a raw request of the same uid: the new rule
    count, or firewalld's refusal."""
    assert client.session is not None
    request = SetShortcutsRequest(client.session, shortcuts, limit)
    _, answer = ask(daemon.socket_path, encode_frame(1, request))
    if isinstance(answer, ErrorAnswer):
        return answer.text
    assert isinstance(answer, SetShortcutsAnswer)
    return answer.rules


SHORTCUT_SUBNETS = [("198.18.0.0/15", 1, 65535), ("fd00:5e::/32", 1, 65535)]
SHORTCUTS = (("198.18.0.5", 7007, 12310), ("fd00:5e::5", 7007, 12310))


def check_shortcuts(netns: str, daemon: Daemon, method: str) -> None:
    """Real connections in the routed namespace of a session of root's with shortcuts (nat
    and nft alike): to a shortcut's destination they reach its local port, up to its limit
    of connections open at once, and past it the session's port; cleared, the session's port
    again. Meanwhile the guard resets another uid's connections to the local port, not the
    owner's."""
    landing = Landing((12300, 12310))
    client, _ = open_session(daemon, method, 12300, SHORTCUT_SUBNETS, [])
    local = [("127.0.0.1", 12310), ("::1", 12310)]
    try:
        [entry] = asyncio.run(client.list_sessions())
        # Each shortcut's rule, and its guard's (root's session names a uid, no gid), and
        # for nat the guard's jump of each IP version.
        guard = 2 + 2 * (method == "nat")
        assert set_shortcuts(daemon, client, SHORTCUTS, 2) == entry.rules + 2 + guard
        # Refused, so never in the listeners' backlog, which reached() reads.
        assert connect(netns, local, as_nobody=True) == ["refused", "refused"]
        assert [landing.reached(host, port) for host, port in local] == [12310, 12310]
        for host in ("198.18.0.5", "fd00:5e::5"):
            assert [landing.reached(host, 7007) for _ in range(3)] == [12310, 12310, 12300]
            assert landing.reached(host, 7008) == 12300  # another port: no shortcut
        assert landing.reached("198.18.0.6", 7007) == 12300  # another address
        # The limit is of connections open at once: once they are closed, the shortcut takes
        # new ones again. The count forgets closed ones at most once a jiffy (nft.py): so
        # bounded tries, a pause between two, each closed at once.
        landing.hang_up()
        reached: list[int | str] = []
        while len(reached) < 50 and 12310 not in reached:
            time.sleep(0.01)
            reached.append(landing.reached("198.18.0.5", 7007))
            landing.hang_up()
        assert reached[-1] == 12310, reached
        assert set_shortcuts(daemon, client, (), 1) == entry.rules
        assert landing.reached("198.18.0.5", 7007) == 12300
        assert landing.reached("fd00:5e::5", 7007) == 12300
        # The guard went with the shortcuts (last: these stay in the backlog).
        assert connect(netns, local, as_nobody=True) == ["connected", "connected"]
    finally:
        close_session(client)
        landing.close()
    assert nothing_of_shuttle(netns)


def check_shortcut_refusals(
    netns: str, daemon: Daemon, listen: Callable[..., Listener], method: str
) -> None:
    """Each shortcut firewalld must refuse, beside a good one, in a real session of root's:
    refused with its reason, the rules as they were."""
    landing = Landing((12300, 12310))
    listen(12311, as_nobody=True)  # uid 65534's, on 127.0.0.1
    excludes = [("198.18.0.99/32", 1, 65535)]
    client, _ = open_session(daemon, method, 12300, SHORTCUT_SUBNETS[:1], excludes)
    try:
        assert isinstance(set_shortcuts(daemon, client, SHORTCUTS[:1], 1), int)
        before = nft(netns, "list", "ruleset")
        for shortcut, refusal in [
            (("192.0.2.7", 80, 12310), "192.0.2.7:80: not inside the session's subnets"),
            (("198.18.0.99", 80, 12310), "198.18.0.99:80: excluded from the session"),
            (("127.0.0.1", 80, 12310), "a loopback address, which no session captures"),
            (("fd00:5e::5", 80, 12310), "this session captures no IPv6"),
            (("198.18.0.5", 80, 12399), "no listening socket of uid 0 on port 12399 at"),
            (("198.18.0.5", 80, 12311), "no listening socket of uid 0 on port 12311 at"),
        ]:
            answer = set_shortcuts(daemon, client, (SHORTCUTS[0], shortcut), 1)
            assert isinstance(answer, str) and refusal in answer, answer
            assert nft(netns, "list", "ruleset") == before
        assert landing.reached("198.18.0.5", 7007) == 12310
    finally:
        close_session(client)
        landing.close()


def check_shortcuts_update(netns: str, daemon: Daemon, method: str) -> None:
    """An update keeps the shortcuts whose destination the session still captures, and
    drops the others (real connections in the routed namespace, a session of root's)."""
    landing = Landing((12300, 12310))
    client, _ = open_session(daemon, method, 12300, SHORTCUT_SUBNETS, [])
    try:
        rules = set_shortcuts(daemon, client, SHORTCUTS, 1)
        assert isinstance(rules, int)
        # 198.18.0.5 excluded from now on: its connections are not captured at all. One
        # shortcut's rule fewer, and its guard's (nft), or its IPv4 guard, rule and jump
        # (nat), which has a rule for the exclude where nft has an element of a set.
        excluded = update_session(client, SHORTCUT_SUBNETS, [("198.18.0.5/32", 1, 65535)])
        assert excluded == rules - 2
        assert landing.reached("198.18.0.5", 7007) == "ConnectionRefusedError"
        assert landing.reached("fd00:5e::5", 7007) == 12310
        assert "drops a shortcut: shortcut to 198.18.0.5:7007: excluded" in daemon.log
        # The dropped shortcut's guard went with it, the other's stays (last: a connection
        # that gets in stays in the backlog, which reached() reads).
        local = [("127.0.0.1", 12310), ("::1", 12310)]
        assert connect(netns, local, as_nobody=True) == ["connected", "refused"]
    finally:
        close_session(client)
        landing.close()
    assert nothing_of_shuttle(netns)

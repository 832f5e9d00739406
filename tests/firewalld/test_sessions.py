"""Sessions: the per-caller checks, leases, and closing; then leases and several sessions at
once for real."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import subprocess
import sys
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from shuttle_client.firewall_session import FirewallError, FirewallSession
from shuttle_firewalld import sessions as sessions_module
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.policy import Policy
from shuttle_firewalld.ports import Listener as ListeningSocket
from shuttle_firewalld.sessions import (
    FREE_CHUNK,
    MAX_SESSIONS_PER_UID,
    MAX_TARGETS_PER_UID,
    Session,
    Sessions,
    Shortcut,
    free_in_pieces,
)
from shuttle_firewalld.sockdiag import SockDiagError
from shuttle_protocol.firewall_messages import (
    MAX_SESSIONS,
    ListSessionsAnswer,
    SessionEntry,
)

from .captures import close_session, open_session
from .daemon import (
    WAIT,
    Daemon,
    Listener,
    nat6_rules,
    nat_rules,
    nft,
    nothing_of_shuttle,
    shuttle_tables,
    wait_until,
)
from .fakes import (
    LISTENERS,
    POLICY_PATH,
    PROGRAM_PORT,
    FakeClock,
    FakeMethod,
    FakeTproxy,
    ReplySockets,
    listening,
    open_request,
    target,
)


def open_one(sessions: Sessions, uid: int = 1000, port: int = 12300) -> str:
    request = open_request(port=port, excludes=("10.1.0.0/16",), uid=uid)
    return sessions.open(uid, request).id


def test_open_applies_and_registers(sessions: Sessions, method: FakeMethod) -> None:
    request = open_request(
        method="auto",
        subnets=("10.0.0.0/8", "2001:db8::/32"),
        excludes=("10.1.0.0/16",),
        gid=27,
    )
    session = sessions.open(1000, request)
    assert method.applied == [session]
    assert session.method == "nft"  # auto, with both methods working
    assert [str(target) for target in session.subnets] == ["10.0.0.0/8", "2001:db8::/32"]
    assert [str(target) for target in session.excludes] == ["10.1.0.0/16"]
    assert session.versions == (4, 6)
    assert (session.caller, session.uid, session.gid, session.forward) == (1000, 1000, 27, False)
    assert session.rules == 3
    assert session.short_id == session.id[:12]
    assert len(session.id) == 32
    assert int(session.id, 16) >= 0
    assert sessions.owned(session.id, 1000) is session


def test_auto_passes_over_a_disabled_method(sessions: Sessions, method: FakeMethod) -> None:
    sessions.disable("nft", "nft failed (exit 1): no")
    assert sessions.open(1000, open_request(method="auto")).method == "nat"
    with pytest.raises(RequestError, match=r"^the nft method does not work on this host \("):
        sessions.open(1000, open_request(method="nft"))
    assert len(method.applied) == 1


@pytest.mark.parametrize(
    ("caller", "port", "versions", "problem"),
    [
        (1000, 12301, ("10.0.0.0/8",), "no listening socket of uid 1000 on port 12301 at"),
        (0, 12300, ("10.0.0.0/8",), "no listening socket of uid 0 on port 12300 at"),
        (1000, 9, ("10.0.0.0/8",), "no listening socket of uid 1000 on port 9 at"),
        (1000, 12303, ("fd00::/8",), "no listening socket of uid 1000 on port 12303 at ::1 or"),
    ],
)
def test_the_port_must_be_the_callers_listener(
    sessions: Sessions, caller: int, port: int, versions: tuple[str, ...], problem: str
) -> None:
    with pytest.raises(RequestError, match=f"^{problem}"):
        sessions.open(caller, open_request(port=port, subnets=versions, uid=caller))
    assert len(sessions) == 0


def test_forward_needs_a_wildcard_listener(sessions: Sessions, method: FakeMethod) -> None:
    with pytest.raises(RequestError, match="at a wildcard address"):
        sessions.open(0, open_request(port=12301, uid=0, forward=True))
    with pytest.raises(RequestError, match="at a wildcard address"):
        sessions.open(0, open_request(port=12300, uid=0, forward=True))  # uid 1000's anyway
    assert method.applied == []


@pytest.mark.parametrize(
    ("uid", "forward", "text"),
    [
        (-1, False, "capturing other users' traffic needs root or a policy entry in "),
        (1001, False, "capturing other users' traffic needs root or a policy entry in "),
        (1000, True, "capturing forwarded traffic needs root or a policy entry in "),
    ],
)
def test_scope_beyond_the_own_uid_is_refused(
    sessions: Sessions, method: FakeMethod, uid: int, forward: bool, text: str
) -> None:
    request = open_request(port=12302, uid=uid, forward=forward)
    with pytest.raises(RequestError) as refused:
        sessions.open(1000, request)
    assert str(refused.value).startswith(text + POLICY_PATH)
    assert method.applied == []


def test_root_may_capture_anyone(sessions: Sessions, method: FakeMethod) -> None:
    session = sessions.open(0, open_request(port=12301, uid=-1, gid=5))
    assert (session.caller, session.uid, session.gid) == (0, -1, 5)
    assert session.scope() == "every uid in gid 5"


def test_sessions_per_uid_are_capped(sessions: Sessions, method: FakeMethod) -> None:
    for _ in range(MAX_SESSIONS_PER_UID):
        open_one(sessions)
    with pytest.raises(RequestError, match="already has 16 sessions open"):
        open_one(sessions)
    open_one(sessions, uid=0, port=12301)  # another uid has its own count
    assert len(method.applied) == MAX_SESSIONS_PER_UID + 1


def test_a_members_sessions_hold_a_bounded_number_of_targets(
    sessions: Sessions, method: FakeMethod
) -> None:
    """Each target costs firewalld memory while its session lives: sixteen sessions of a
    member hold together no more than one session of the protocol's largest."""
    half = [f"10.{i // 256}.{i % 256}.0/24" for i in range(MAX_TARGETS_PER_UID // 2)]
    first = sessions.open(1000, open_request(subnets=tuple(half)))
    refused = f"uid 1000's sessions would hold {MAX_TARGETS_PER_UID + 1} subnets and excludes"
    with pytest.raises(RequestError, match=refused):
        sessions.open(1000, open_request(subnets=tuple(half), excludes=("10.0.0.0/24",)))
    second = sessions.open(1000, open_request(subnets=tuple(half)))
    update = tuple(map(target, ["10.0.0.0/8", "10.0.0.0/24"]))
    with pytest.raises(RequestError, match=refused):
        sessions.update(second, (*map(target, half), update[0]), ())
    assert sessions.update(first, update[:1], update[1:]) == 2  # its own targets are replaced
    sessions.open(0, open_request(port=12301, subnets=tuple(half)))  # root's are not counted
    assert len(method.applied) == 3


def test_a_failed_apply_registers_nothing(sessions: Sessions, method: FakeMethod) -> None:
    method.fail_apply = RequestError("iptables-restore failed (exit 1): no")
    with pytest.raises(RequestError, match="iptables-restore failed"):
        open_one(sessions)
    assert len(sessions) == 0


def test_lease_runs_out_without_renewal(
    sessions: Sessions, method: FakeMethod, clock: FakeClock
) -> None:
    kept, lapsed = open_one(sessions), open_one(sessions)
    clock.now += 5
    sessions.renew(sessions.owned(kept, 1000))
    assert sessions.expire() == 0
    clock.now += 1
    assert sessions.expire() == 1
    assert [session.id for session in method.removed] == [lapsed]
    assert sessions.owned(kept, 1000).id == kept
    with pytest.raises(RequestError, match="no such session"):
        sessions.owned(lapsed, 1000)


def test_close_removes_even_if_the_method_raises(sessions: Sessions, method: FakeMethod) -> None:
    method.fail_remove = RuntimeError("bug")
    first, second = open_one(sessions), open_one(sessions)
    sessions.close_all("closed at exit")
    assert [session.id for session in method.removed] == [first, second]
    assert len(sessions) == 0


def test_nameservers_need_the_callers_udp_socket_too(
    sessions: Sessions, method: FakeMethod
) -> None:
    with pytest.raises(RequestError, match=r"^no UDP socket of uid 1000 on port 12300 at 127\."):
        sessions.open(1000, open_request(dns=("10.53.0.53",)))
    # An IPv6 nameserver needs the TCP listener's IPv6 side as well: DNS over TCP lands there.
    with pytest.raises(
        RequestError, match=r"^no listening socket of uid 1000 on port 12303 at ::1 "
    ):
        sessions.open(1000, open_request(port=12303, dns=("fd00:53::53",)))
    with pytest.raises(RequestError, match=r"^no UDP socket of uid 1000 on port 12304 at ::1 "):
        sessions.open(1000, open_request(port=12304, dns=("fd00:53::53",)))
    assert method.applied == []
    session = sessions.open(
        1000, open_request(port=12304, dns=("10.53.0.53", "127.0.0.53", "10.53.0.53"))
    )
    assert [str(address) for address in session.dns] == ["10.53.0.53", "127.0.0.53"]
    assert method.applied == [session]


def test_the_versions_of_the_nameservers_count(tproxy_sessions: Sessions) -> None:
    request = open_request(method="tproxy", subnets=("10.0.0.0/8",), dns=("fd00:53::53",))
    session = tproxy_sessions.open(1000, request)
    assert session.versions == (4, 6)
    assert sorted(session.sockets) == ["tcp4", "tcp6", "udp4", "udp6"]


def test_a_reply_socket_at_a_nameservers_port_53_even_if_excluded(
    tproxy_sessions: Sessions, reply_sockets: ReplySockets
) -> None:
    request = open_request(
        method="tproxy", subnets=("198.18.0.0/15",), excludes=("10.53.0.0/16",), dns=("10.53.0.53",)
    )
    session = tproxy_sessions.open(1000, request)
    tproxy_sessions.reply_socket(session, "10.53.0.53", 53, "198.18.0.1", PROGRAM_PORT)
    assert [(address, port) for address, port, _ in reply_sockets.made] == [("10.53.0.53", 53)]
    for address, port in (("10.53.0.53", 54), ("10.53.0.54", 53)):
        with pytest.raises(RequestError, match="is not inside the session's subnets"):
            tproxy_sessions.reply_socket(session, address, port, "198.18.0.1", PROGRAM_PORT)


# --- what callers see, and updates ---------------------------------------------------


def test_a_caller_sees_its_own_sessions_and_root_sees_every_one(
    sessions: Sessions, clock: FakeClock
) -> None:
    mine = sessions.open(1000, open_request(excludes=("10.1.0.0/16",), dns=(), gid=27))
    clock.now += 2.5
    roots = sessions.open(
        0, open_request(port=12301, uid=-1, subnets=("10.0.0.0/8", "192.0.2.0/24"))
    )
    clock.now += 1
    [entry] = sessions.visible(1000)
    assert entry == SessionEntry(
        session=mine.short_id,
        caller=1000,
        method="nat",
        port=12300,
        subnets=1,
        excludes=1,
        nameservers=0,
        rules=2,
        uid=1000,
        gid=27,
        forward=False,
        opened=3.5,
        lease=2.5,
        hosts=0,
    )
    assert [entry.session for entry in sessions.visible(0)] == [mine.short_id, roots.short_id]
    assert sessions.visible(0)[1][1:4] == (0, "nat", 12301)
    # Another uid's sessions stay invisible, as they do for requests that name one.
    assert sessions.visible(1001) == ()


def test_a_lapsed_lease_is_listed_as_none_left(sessions: Sessions, clock: FakeClock) -> None:
    open_one(sessions)
    clock.now += 6.5  # not expired yet: the loop has not looked
    assert sessions.visible(1000)[0].lease == 0.0


def test_the_count_of_sessions_is_reported_as_it_changes(
    method: FakeMethod, clock: FakeClock
) -> None:
    counts: list[int] = []
    sessions = Sessions(
        {"nat": method, "nft": method},
        6.0,
        listeners_of_port=lambda port: LISTENERS.get(port, []),
        clock=clock,
        on_change=counts.append,
    )
    first = open_one(sessions)
    open_one(sessions)
    method.fail_apply = RequestError("no")
    with pytest.raises(RequestError):
        open_one(sessions)
    session = sessions.owned(first, 1000)
    sessions.close(session, "closed")
    sessions.close(session, "closed again")  # not open any more: no change
    clock.now += 7
    sessions.expire()
    assert counts == [1, 2, 1, 0]


def test_a_report_that_fails_changes_nothing(
    method: FakeMethod, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(count: int) -> None:
        raise OSError("no")

    sessions = Sessions(
        {"nat": method},
        6.0,
        listeners_of_port=lambda port: LISTENERS.get(port, []),
        clock=clock,
        on_change=broken,
    )
    session_id = open_one(sessions)
    sessions.close(sessions.owned(session_id, 1000), "closed")
    assert len(sessions) == 0
    assert [session.id for session in method.removed] == [session_id]
    assert caplog.text.count("reporting the number of sessions failed") == 2


def test_sessions_are_capped_in_all(method: FakeMethod, clock: FakeClock) -> None:
    # Each uid u listens on port 20000 + u.
    sessions = Sessions(
        {"nat": method},
        6.0,
        listeners_of_port=lambda port: listening(port, port - 20000, "127.0.0.1"),
        clock=clock,
    )
    for uid in range(1, MAX_SESSIONS // MAX_SESSIONS_PER_UID + 1):
        for _ in range(MAX_SESSIONS_PER_UID):
            open_one(sessions, uid=uid, port=20000 + uid)
    assert len(sessions) == MAX_SESSIONS
    with pytest.raises(RequestError, match=r"^this firewalld has 1024 sessions open already$"):
        open_one(sessions, uid=999, port=20999)
    assert len(sessions.visible(0)) == MAX_SESSIONS
    ListSessionsAnswer(sessions.visible(0))  # the answer holds them all


def update(sessions: Sessions, session: Session, subnets: Any, excludes: Any = ()) -> int:
    return sessions.update(session, tuple(map(target, subnets)), tuple(map(target, excludes)))


def test_an_update_replaces_subnets_and_excludes(sessions: Sessions, method: FakeMethod) -> None:
    session = sessions.owned(open_one(sessions), 1000)
    assert update(sessions, session, ["192.0.2.0/24", "10.0.0.0/8"], ["192.0.2.7/32"]) == 3
    [(updated, subnets, excludes)] = method.updated
    assert updated is session
    assert [str(item) for item in subnets] == ["192.0.2.0/24", "10.0.0.0/8"]
    assert (session.subnets, session.excludes) == (subnets, excludes)
    assert session.rules == 3
    assert [str(item) for item in excludes] == ["192.0.2.7/32"]
    assert sessions.visible(1000)[0][4:8] == (2, 1, 0, 3)


def test_a_new_ip_version_needs_the_callers_listener_there(
    sessions: Sessions, method: FakeMethod
) -> None:
    session = sessions.owned(open_one(sessions, port=12303), 1000)  # 127.0.0.1 only
    before = (session.subnets, session.excludes, session.rules)
    with pytest.raises(
        RequestError, match=r"^no listening socket of uid 1000 on port 12303 at ::1 "
    ):
        update(sessions, session, ["10.0.0.0/8", "fd00::/8"])
    assert method.updated == []
    assert (session.subnets, session.excludes, session.rules) == before
    # The versions it has need no new check: another IPv4 subnet is fine.
    update(sessions, session, ["192.0.2.0/24"])
    assert len(method.updated) == 1


def test_an_update_needs_the_port_to_be_the_callers_still(
    sessions: Sessions, method: FakeMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = sessions.owned(open_one(sessions, port=12303), 1000)
    # The caller closed its listener, and uid 0 took the port: no more traffic goes there.
    monkeypatch.setitem(LISTENERS, 12303, listening(12303, 0, "127.0.0.1"))
    with pytest.raises(RequestError, match=r"^no listening socket of uid 1000 on port 12303 "):
        update(sessions, session, ["10.0.0.0/8", "192.0.2.0/24"])
    assert method.updated == []


def test_an_update_renews_the_lease(
    sessions: Sessions, method: FakeMethod, clock: FakeClock
) -> None:
    session = sessions.owned(open_one(sessions), 1000)
    clock.now += 5.0  # of a 6 s lease: the update itself may have taken this long
    update(sessions, session, ["192.0.2.0/24"])
    clock.now += 5.0
    assert sessions.expire() == 0


class Tracked:
    """An object that notes, as it is freed, how many items its list still holds."""

    def __init__(self, items: list[object], freed: list[int]) -> None:
        self._items, self._freed = items, freed

    def __del__(self) -> None:
        self._freed.append(len(self._items))


def test_free_in_pieces_frees_a_chunk_at_a_time() -> None:
    # Each chunk is one call in C, which holds the GIL throughout; the loop's thread gets
    # its turn between two of them.
    items: list[object] = []
    freed: list[int] = []
    items += [Tracked(items, freed) for _ in range(2 * FREE_CHUNK + FREE_CHUNK // 2)]
    free_in_pieces(items)
    assert items == []
    assert sorted(Counter(freed).items()) == [
        (0, FREE_CHUNK // 2),
        (FREE_CHUNK // 2, FREE_CHUNK),
        (FREE_CHUNK + FREE_CHUNK // 2, FREE_CHUNK),
    ]


def many(count: int, first: str = "10") -> list[str]:
    return [f"{first}.{i // 256}.{i % 256}.0/24" for i in range(count)]


def test_a_closed_sessions_targets_are_freed_in_pieces_at_once(
    sessions: Sessions, method: FakeMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Freed whenever the last reference went, the tuple of them was freed in one call.
    handed: list[int] = []

    def noting(items: list[object]) -> None:
        handed.append(len(items))
        free_in_pieces(items)

    monkeypatch.setattr(sessions_module, "free_in_pieces", noting)
    session = sessions.owned(open_one(sessions), 1000)
    update(sessions, session, many(3000), many(500, "11"))
    old = [weakref.ref(item) for item in method.updated[0][1]]
    method.updated.clear()
    update(sessions, session, many(2000))  # the old 3,500 go, in pieces
    assert handed == [2, 3500]  # what open gave, then what the first update gave
    assert all(ref() is None for ref in old)
    kept = [weakref.ref(item) for item in session.subnets]
    method.updated.clear()
    sessions.close(session, "closed")
    assert handed[-1] == 2000
    assert (session.subnets, session.excludes) == ((), ())
    assert all(ref() is None for ref in kept)  # though the session itself is still here


def test_a_failed_update_frees_its_targets_in_pieces(
    sessions: Sessions, method: FakeMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    handed: list[int] = []
    monkeypatch.setattr(sessions_module, "free_in_pieces", lambda items: handed.append(len(items)))
    session = sessions.owned(open_one(sessions, port=12303), 1000)  # 127.0.0.1 only
    with pytest.raises(RequestError, match="no listening socket"):
        update(sessions, session, [*many(10), "fd00::/8"])  # the port check refuses
    method.fail_update = RequestError("nft failed (exit 1): File exists")
    with pytest.raises(RequestError, match="File exists"):
        update(sessions, session, many(20), many(5))
    assert handed == [11, 25]


def test_a_failed_update_changes_nothing(sessions: Sessions, method: FakeMethod) -> None:
    session = sessions.owned(open_one(sessions), 1000)
    before = (session.subnets, session.excludes, session.rules)
    method.fail_update = RequestError("nft failed (exit 1): File exists")
    with pytest.raises(RequestError, match="File exists"):
        update(sessions, session, ["192.0.2.0/24"])
    assert (session.subnets, session.excludes, session.rules) == before


def test_a_tproxy_update_needs_no_listener_of_the_callers(
    tproxy_sessions: Sessions, tproxy: FakeTproxy
) -> None:
    session = tproxy_sessions.open(1000, open_request(method="tproxy", port=1))
    update(tproxy_sessions, session, ["10.0.0.0/8", "fd00::/8"])  # the method decides
    assert len(tproxy.updated) == 1


def test_an_update_asks_the_policy_again(sessions: Sessions, method: FakeMethod) -> None:
    session = sessions.owned(open_one(sessions), 1000)
    session.uid = 1001  # as if the policy had allowed it at open, and no longer does
    with pytest.raises(RequestError, match=r"^capturing other users' traffic needs root"):
        update(sessions, session, ["192.0.2.0/24"])
    assert method.updated == []


# --- real daemon ---------------------------------------------------------------------


@pytest.mark.integration
def test_without_heartbeat_the_rules_go(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    daemon = start_firewalld(lease=2)
    listen(12300)
    client = FirewallSession(str(daemon.socket_path))

    async def open_and_forget() -> str | None:
        await client.open("auto", 12300, ["10.0.0.0/8"], [])
        return client.session

    try:
        session_id = asyncio.run(open_and_forget())
        assert session_id is not None
        assert shuttle_tables(netns) != []
        assert wait_until(lambda: shuttle_tables(netns) == [], timeout=WAIT)
        daemon.wait_for_line(f"shuttle-firewalld: session {session_id[:12]} of uid 0 expired")
    finally:
        asyncio.run(client.close())


@pytest.mark.integration
@pytest.mark.parametrize("method", ["nft", "nat"])
def test_two_sessions_coexist_and_closing_one_leaves_the_other(
    netns: str,
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
    method: str,
) -> None:
    daemon = start_firewalld(lease=30)
    listen(12300, addresses=("127.0.0.1", "::1"))
    listen(12301, addresses=("127.0.0.1",))
    first, _ = open_session(
        daemon, method, 12300, [("10.0.0.0/8", 1, 65535), ("fd00:5e::/32", 80, 90)], []
    )
    second = None
    try:
        second, _ = open_session(
            daemon, method, 12301, [("192.0.2.0/24", 443, 443)], [("192.0.2.7/32", 1, 65535)], -1
        )

        def state() -> tuple[list[str], ...]:
            if method == "nat":
                return (nat_rules(netns), nat6_rules(netns))
            tables = shuttle_tables(netns)
            return (tables, [nft(netns, "list", "table", "inet", table) for table in tables])

        both = state()
        assert len([line for line in both[0] if "shuttle-" in line.lower()]) == (
            2 if method == "nft" else 11
        )
        close_session(first)
        assert first.session is None
        assert second.session is not None
        left = "shuttle-" if method == "nft" else "SHUTTLE-"
        left += second.session[:12]
        if method == "nft":
            tables, listings = state()
            # The second session's table is there, exactly as it was.
            assert tables == [left]
            assert listings == [listing for listing in both[1] if left in listing]
        else:
            ipv4, ipv6 = state()
            assert ipv4 == [line for line in both[0] if first_chain(both[0], left) not in line]
            assert [line for line in ipv6 if "SHUTTLE-" in line] == []  # only the first had IPv6
            assert f"-A OUTPUT -p tcp -j {left}" in ipv4  # uid -1: no owner match
    finally:
        close_session(first)
        if second is not None:
            close_session(second)
    assert nothing_of_shuttle(netns)
    assert daemon.log.count("nft rules removed" if method == "nft" else "nat rules removed") == 2


def first_chain(lines: list[str], other: str) -> str:
    """The name of the SHUTTLE chain in lines that is not other."""
    return next(
        line.split()[0][1:]
        for line in lines
        if line.startswith(":SHUTTLE-") and not line.startswith(f":{other}")
    )


def test_a_socket_table_that_cannot_be_read_refuses_the_port(
    method: FakeMethod, clock: FakeClock
) -> None:
    def unreadable(port: int) -> list[ListeningSocket]:
        raise SockDiagError("sock_diag: [Errno 111] no")

    sessions = Sessions(
        {"nat": method}, 6.0, policy=Policy(POLICY_PATH), listeners_of_port=unreadable, clock=clock
    )
    with pytest.raises(
        RequestError, match=r"^cannot tell who listens on port 12300: sock_diag: \[Errno 111\] no$"
    ):
        sessions.open(1000, open_request(port=12300))
    assert (len(sessions), method.applied) == (0, [])


# --- the session ends with the process that opened it ----------------------------------


@pytest.fixture
def opener() -> Iterator[subprocess.Popen[bytes]]:
    """A process of ours (root's) to open sessions as; killed and reaped afterwards."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(WAIT)


def open_as(sessions: Sessions, pid: int) -> Session:
    return sessions.open(0, open_request(port=12301, uid=0), pid)


def test_a_session_ends_when_its_opener_exits(
    sessions: Sessions, method: FakeMethod, opener: subprocess.Popen[bytes]
) -> None:
    session = open_as(sessions, opener.pid)
    assert (session.pid, len(sessions.exits), sessions.expire()) == (opener.pid, 1, 0)
    opener.kill()
    opener.wait(WAIT)
    # The clock stands still: no lease runs out, the exit alone ends the session.
    assert wait_until(lambda: sessions.expire() == 1)
    assert (method.removed, len(sessions), len(sessions.exits)) == ([session], 0, 0)
    with pytest.raises(RequestError, match="no such session"):
        sessions.owned(session.id, 0)


def test_closing_a_session_stops_watching_its_opener(
    sessions: Sessions, opener: subprocess.Popen[bytes]
) -> None:
    sessions.close(open_as(sessions, opener.pid), "closed by uid 0")
    assert len(sessions.exits) == 0


def test_a_session_of_an_opener_that_is_gone_is_refused(
    sessions: Sessions, method: FakeMethod, opener: subprocess.Popen[bytes]
) -> None:
    opener.kill()
    opener.wait(WAIT)
    with pytest.raises(
        RequestError,
        match=rf"^cannot watch the calling process: the calling process \(pid {opener.pid}\) "
        "has exited$",
    ):
        open_as(sessions, opener.pid)
    assert (method.applied, len(sessions), len(sessions.exits)) == ([], 0, 0)


def test_a_session_that_fails_to_apply_leaves_no_watch(
    sessions: Sessions, method: FakeMethod, opener: subprocess.Popen[bytes]
) -> None:
    method.fail_apply = RequestError("nft failed (exit 1): no")
    with pytest.raises(RequestError, match="nft failed"):
        open_as(sessions, opener.pid)
    assert (len(sessions), len(sessions.exits)) == (0, 0)


def test_the_watched_openers_are_bounded_by_the_session_cap(
    sessions: Sessions, opener: subprocess.Popen[bytes]
) -> None:
    for _ in range(MAX_SESSIONS_PER_UID):
        open_as(sessions, opener.pid)
    with pytest.raises(RequestError, match="already has"):
        open_as(sessions, opener.pid)
    assert len(sessions.exits) == MAX_SESSIONS_PER_UID
    sessions.close_all("test over")
    assert len(sessions.exits) == 0


@pytest.mark.integration
def test_the_real_daemon_ends_a_session_when_its_client_is_killed(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    """A client killed with SIGKILL sends no CloseSession; the lease (a minute here) would
    keep its rules, and its freed port open to anyone, that long."""
    daemon = start_firewalld(lease=60)
    listen(12300)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(daemon.socket_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        session_id = holder.stdout.readline().split()[-1]
        assert shuttle_tables(netns) == [f"shuttle-{session_id[:12]}"]
        holder.kill()
        holder.wait(WAIT)
        assert wait_until(lambda: shuttle_tables(netns) == [])
        daemon.wait_for_line(
            f"shuttle-firewalld: session {session_id[:12]} of uid 0 ended: its process "
            f"(pid {holder.pid}) exited: "
        )
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(WAIT)
        if holder.stdout is not None:
            holder.stdout.close()


# Opens a session into port 12300 and holds it, without heartbeats; prints its id.
HOLDER = """
import asyncio, sys, time
from shuttle_client.firewall_session import FirewallSession

async def main():
    client = FirewallSession(sys.argv[1])
    await client.open("nft", 12300, ["10.0.0.0/8"], [])
    print("session", client.session, flush=True)

asyncio.run(main())
time.sleep(120)
"""


@pytest.mark.integration
def test_the_real_daemon_refuses_ipv4_into_an_ipv6_only_wildcard_listener(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    """The review's case: an IPv4 session into an IPV6_V6ONLY [::]:P (as the client's own
    listeners are) was accepted, and anyone could then bind 0.0.0.0:P and take the
    connections."""
    daemon = start_firewalld(lease=60)
    listen(12300, addresses=("::",), v6only=True)
    with pytest.raises(FirewallError) as refused:
        open_session(daemon, "nft", 12300, ["10.0.0.0/8"], [])
    assert str(refused.value) == (
        "shuttle-firewalld: no listening socket of uid 0 on port 12300 at 127.0.0.1 or a "
        "wildcard address, where IPv4 connections land"
    )
    assert shuttle_tables(netns) == []
    client, _ = open_session(daemon, "nft", 12300, ["fd00::/8"], [])  # IPv6 lands there
    try:
        assert len(shuttle_tables(netns)) == 1
    finally:
        close_session(client)


# --- shortcuts ------------------------------------------------------------------------


def open_for_shortcuts(sessions: Sessions, **changes: Any) -> Session:
    """uid 1000's session of 10.0.0.0/8 (and fd00::/8) but 10.1.0.0/16 into port 12300."""
    request = open_request(subnets=("10.0.0.0/8", "fd00::/8"), excludes=("10.1.0.0/16",), **changes)
    return sessions.open(1000, request)


def test_shortcuts_go_into_the_rules_and_onto_the_session(
    sessions: Sessions, method: FakeMethod, clock: FakeClock
) -> None:
    session = open_for_shortcuts(sessions)
    clock.now += 5.0  # of a 6 s lease: renewed once the rules are in, as by an update
    # 12300: uid 1000 on both loopbacks; 12302: on the wildcard addresses (they cover it).
    asked = (("10.2.0.2", 7007, 12300), ("fd00::7", 443, 12302))
    assert sessions.set_shortcuts(session, asked, 200) == 5  # the fake counts them
    wanted = (
        Shortcut(ipaddress.ip_address("10.2.0.2"), 7007, 12300, 200),
        Shortcut(ipaddress.ip_address("fd00::7"), 443, 12302, 200),
    )
    assert method.shortcuts == [wanted]
    [(updated, subnets, excludes)] = method.updated
    assert (updated, subnets, excludes) == (session, session.subnets, session.excludes)
    assert (session.shortcuts, session.rules) == (wanted, 5)
    clock.now += 5.0
    assert sessions.expire() == 0
    # None is every shortcut gone.
    assert sessions.set_shortcuts(session, (), 1) == 3
    assert method.shortcuts[-1] == ()
    assert (session.shortcuts, session.rules) == ((), 3)


def test_shortcuts_ask_the_policy_again(sessions: Sessions, method: FakeMethod) -> None:
    session = open_for_shortcuts(sessions)
    session.uid = 1001  # as if the policy had allowed it at open, and no longer does
    with pytest.raises(RequestError, match=r"^capturing other users' traffic needs root"):
        sessions.set_shortcuts(session, (("10.2.0.2", 7007, 12300),), 200)
    assert method.shortcuts == []


@pytest.mark.parametrize(
    ("shortcut", "refusal"),
    [
        (("192.0.2.7", 80, 12300), "shortcut to 192.0.2.7:80: not inside the session's subnets"),
        (("10.1.0.2", 80, 12300), "shortcut to 10.1.0.2:80: excluded from the session"),
        (("127.0.0.1", 80, 12300), "a loopback address, which no session captures"),
        (("::1", 80, 12300), "a loopback address, which no session captures"),
        (("10.0.0.53", 53, 12300), "a nameserver of the session, whose DNS it captures"),
        # Nobody listens on 12399; 12301 is uid 0's; 12303 is uid 1000's on 127.0.0.1 only.
        (("10.2.0.2", 80, 12399), "no listening socket of uid 1000 on port 12399 at 127.0.0.1"),
        (("10.2.0.2", 80, 12301), "no listening socket of uid 1000 on port 12301 at 127.0.0.1"),
        (("fd00::7", 80, 12303), "no listening socket of uid 1000 on port 12303 at ::1 or"),
    ],
)
def test_a_refused_shortcut_changes_nothing(
    sessions: Sessions, method: FakeMethod, shortcut: tuple[str, int, int], refusal: str
) -> None:
    session = open_for_shortcuts(sessions, port=12304, dns=("10.0.0.53",))
    good = ("10.2.0.2", 7007, 12300)
    sessions.set_shortcuts(session, (good,), 2)
    before = (session.shortcuts, session.rules)
    with pytest.raises(RequestError, match=re.escape(refusal)):
        sessions.set_shortcuts(session, (good, shortcut), 2)
    assert (session.shortcuts, session.rules) == before
    assert len(method.updated) == 1


def test_a_shortcut_of_another_uids_listener_is_refused_beside_the_callers(
    sessions: Sessions, method: FakeMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = open_for_shortcuts(sessions)
    # uid 1000 listens on the wildcard address, uid 0 on 127.0.0.1 of the same port
    # (SO_REUSEADDR): connections redirected there would land on uid 0's.
    both = listening(12310, 1000, "0.0.0.0") + listening(12310, 0, "127.0.0.1")
    monkeypatch.setitem(LISTENERS, 12310, both)
    with pytest.raises(RequestError, match=r"port 12310 has listeners of other users too \(uid 0"):
        sessions.set_shortcuts(session, (("10.2.0.2", 80, 12310),), 1)
    assert method.updated == []


def test_a_version_the_session_does_not_capture_is_refused(
    sessions: Sessions, method: FakeMethod
) -> None:
    session = sessions.owned(open_one(sessions), 1000)  # IPv4 only
    with pytest.raises(
        RequestError, match=r"^shortcut to \[fd00::7\]:80: this session captures no IPv6$"
    ):
        sessions.set_shortcuts(session, (("fd00::7", 80, 12300),), 1)
    assert method.updated == []


def test_a_tproxy_session_has_no_shortcuts(tproxy_sessions: Sessions, tproxy: FakeTproxy) -> None:
    session = tproxy_sessions.open(1000, open_request(method="tproxy"))
    with pytest.raises(
        RequestError, match=r"^shortcuts need the nft or nat method, this session uses tproxy$"
    ):
        tproxy_sessions.set_shortcuts(session, (("10.2.0.2", 80, 12300),), 1)
    assert tproxy.updated == []


def test_a_forwarding_nat_session_has_no_shortcuts_but_an_nft_one_may(
    sessions: Sessions, method: FakeMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(LISTENERS, 12320, listening(12320, 0, "0.0.0.0"))
    nat = sessions.open(0, open_request(port=12320, uid=0, forward=True))
    with pytest.raises(RequestError, match=r"^shortcuts need the nft method in a session that"):
        sessions.set_shortcuts(nat, (("10.2.0.2", 80, 12320),), 1)
    assert method.updated == []
    sessions.set_shortcuts(nat, (), 1)  # clearing none is fine
    nft = sessions.open(0, open_request(method="nft", port=12320, uid=0, forward=True))
    assert sessions.set_shortcuts(nft, (("10.2.0.2", 80, 12320),), 1) == 3


def test_an_update_keeps_the_shortcuts_it_still_captures(
    sessions: Sessions, method: FakeMethod, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = open_for_shortcuts(sessions)
    asked = (("10.2.0.2", 7007, 12300), ("10.3.0.2", 7007, 12300), ("fd00::7", 443, 12302))
    sessions.set_shortcuts(session, asked, 9)
    # 10.3.0.2 is excluded from now on, and uid 0 took 12302 from the caller: both go.
    monkeypatch.setitem(LISTENERS, 12302, listening(12302, 0, "::"))
    update(sessions, session, ["10.0.0.0/8", "fd00::/8"], ["10.3.0.0/16"])
    kept = (Shortcut(ipaddress.ip_address("10.2.0.2"), 7007, 12300, 9),)
    assert method.shortcuts[-1] == kept
    assert session.shortcuts == kept
    # A failed update keeps them all as they were.
    method.fail_update = RequestError("nft failed")
    with pytest.raises(RequestError):
        update(sessions, session, ["192.0.2.0/24"])
    assert session.shortcuts == kept

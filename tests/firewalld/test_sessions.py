"""Sessions: the per-caller policy checks, leases, and closing; then leases for real."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from shuttle_client.firewall_session import FirewallError, FirewallSession
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.sessions import MAX_SESSIONS_PER_UID, Sessions
from shuttle_protocol.firewall_messages import CloseSessionAnswer, CloseSessionRequest
from shuttle_protocol.frames import encode_frame

from .conftest import (
    WAIT,
    Daemon,
    FakeClock,
    FakeMethod,
    Listener,
    ask,
    shuttle_rules,
    wait_until,
)


def open_one(sessions: Sessions, uid: int = 1000, port: int = 12300) -> str:
    return sessions.open(uid, "nat", port, ["10.0.0.0/8"], ["10.1.0.0/16"]).id


def test_open_applies_and_registers(sessions: Sessions, method: FakeMethod) -> None:
    session = sessions.open(1000, "nat", 12300, ["10.0.0.0/8", "2001:db8::/32"], ["10.1.0.0/16"])
    assert method.applied == [session]
    assert [str(net) for net in session.subnets] == ["10.0.0.0/8", "2001:db8::/32"]
    assert [str(net) for net in session.excludes] == ["10.1.0.0/16"]
    assert session.rules == 3
    assert session.short_id == session.id[:12]
    assert len(session.id) == 32
    assert int(session.id, 16) >= 0
    assert sessions.owned(session.id, 1000) is session


def test_unknown_method(sessions: Sessions, method: FakeMethod) -> None:
    with pytest.raises(RequestError, match="unknown method 'nft'"):
        sessions.open(1000, "nft", 12300, ["10.0.0.0/8"], [])
    assert method.applied == []


@pytest.mark.parametrize(("uid", "port"), [(1000, 12301), (0, 12300), (1000, 9)])
def test_the_port_must_be_the_callers_listener(
    sessions: Sessions, method: FakeMethod, uid: int, port: int
) -> None:
    with pytest.raises(RequestError, match=f"^port {port} is not a listening socket of uid {uid}$"):
        open_one(sessions, uid, port)
    assert method.applied == []


def test_sessions_per_uid_are_capped(sessions: Sessions, method: FakeMethod) -> None:
    for _ in range(MAX_SESSIONS_PER_UID):
        open_one(sessions)
    with pytest.raises(RequestError, match="already has 16 sessions open"):
        open_one(sessions)
    open_one(sessions, uid=0, port=12301)  # another uid has its own count
    assert len(method.applied) == MAX_SESSIONS_PER_UID + 1


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


# --- real daemon ---------------------------------------------------------------------


@pytest.mark.integration
def test_without_heartbeat_the_rules_go(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    daemon = start_firewalld(lease=2)
    listen(12300)
    client = FirewallSession(str(daemon.socket_path))

    async def open_and_forget() -> str | None:
        await client.open("nat", 12300, ["10.0.0.0/8"], [])
        return client.session

    try:
        session_id = asyncio.run(open_and_forget())
        assert session_id is not None
        assert shuttle_rules(netns) != []
        assert wait_until(lambda: shuttle_rules(netns) == [], timeout=WAIT)
        daemon.wait_for_line(f"shuttle-firewalld: session {session_id[:12]} of uid 0 expired")
    finally:
        asyncio.run(client.close())


@pytest.mark.integration
def test_heartbeats_keep_the_rules(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    daemon = start_firewalld(lease=2)
    listen(12300)

    async def beat_through_leases() -> list[str]:
        client = FirewallSession(str(daemon.socket_path))
        try:
            await client.open("nat", 12300, ["10.0.0.0/8"], [])
            beating = asyncio.ensure_future(client.run_heartbeats())
            await asyncio.sleep(5)  # two and a half leases
            assert not beating.done()
            rules = shuttle_rules(netns)
            # As shuttle-client does: close first, then stop the heartbeats.
            await client.close()
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)
            return rules
        finally:
            await client.close()

    rules = asyncio.run(beat_through_leases())
    assert len(rules) == 4  # the chain, its loopback RETURN and its REDIRECT, the jump
    assert shuttle_rules(netns) == []
    assert "expired" not in daemon.log


@pytest.mark.integration
def test_heartbeats_say_when_the_session_is_gone(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    daemon = start_firewalld(lease=2)
    listen(12300)

    async def lose_the_session() -> str:
        client = FirewallSession(str(daemon.socket_path))
        try:
            await client.open("nat", 12300, ["10.0.0.0/8"], [])
            assert client.session is not None
            # Someone else with the same uid closes it (shuttle-client ctl might).
            assert (
                ask(daemon.socket_path, encode_frame(1, CloseSessionRequest(client.session)))[1]
                == CloseSessionAnswer()
            )
            with pytest.raises(FirewallError) as lost:
                await asyncio.wait_for(client.run_heartbeats(), WAIT)
            return str(lost.value)
        finally:
            await client.close()

    assert asyncio.run(lose_the_session()) == (
        "lost the firewall session: shuttle-firewalld: no such session"
    )

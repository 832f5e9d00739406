"""The client's side of the firewalld RPC (FirewallSession) against the real shuttle-firewalld
in a network namespace: heartbeats, a session lost, a firewalld gone or not there."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
from firewalld.daemon import WAIT, Daemon, Listener, ask, shuttle_rules, shuttle_tables
from shuttle_client.firewall_session import (
    FirewallError,
    FirewallSession,
    FirewallUnavailable,
    stop_monitor,
)
from shuttle_protocol.firewall_messages import CloseSessionAnswer, CloseSessionRequest
from shuttle_protocol.frames import encode_frame


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
    assert len(rules) == 5  # the chain, its local, loopback RETURNs and REDIRECT, the jump
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
            await client.open("auto", 12300, ["10.0.0.0/8"], [])
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

    assert asyncio.run(lose_the_session()) == "shuttle-firewalld: no such session"


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_heartbeats_see_firewalld_go_at_once_and_the_session_opens_again(
    netns: str,
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
    sig: signal.Signals,
) -> None:
    # A long lease: losing the session must not wait for a heartbeat to go unanswered.
    first = start_firewalld(lease=60)
    listen(12300)
    client = FirewallSession(str(first.socket_path))

    async def restart_under_heartbeats() -> tuple[str, str | None]:
        try:
            await client.open("nft", 12300, ["10.0.0.0/8"], [])
            beating = asyncio.ensure_future(client.run_heartbeats())
            first.proc.send_signal(sig)
            with pytest.raises(FirewallUnavailable) as lost:
                await asyncio.wait_for(beating, WAIT)
            assert client.session is None
            start_firewalld(lease=60)  # on the same socket path
            # The same object opens a new session, over a new connection.
            await client.open("nft", 12300, ["10.0.0.0/8"], [], timeout=WAIT)
            return str(lost.value), client.session
        finally:
            await client.close()

    lost, session = asyncio.run(restart_under_heartbeats())
    assert lost == (
        f"shuttle-firewalld at {first.socket_path} dropped the connection (it stopped or restarted)"
    )
    assert session is not None
    assert shuttle_tables(netns) == []  # closed, and the killed one's table is gone as well


def test_a_missing_firewalld_is_unavailable_not_refused(tmp_path: Path) -> None:
    client = FirewallSession(str(tmp_path / "firewalld.sock"))
    with pytest.raises(FirewallUnavailable, match="is it running"):
        asyncio.run(client.open("nft", 12300, ["10.0.0.0/8"], []))


async def try_open(path: Path, timeout: float = 1) -> str:
    """What opening a session at path within timeout says: its error, or "opened"."""
    client = FirewallSession(str(path))
    try:
        await client.open("nat", 12300, ["10.0.0.0/8"], [], timeout=timeout)
    except FirewallError as exc:
        return str(exc)
    finally:
        await client.close()
    return "opened"


@pytest.mark.integration
def test_the_client_says_when_firewalld_is_not_there(socket_dir: Path) -> None:
    missing = socket_dir / "missing.sock"
    assert asyncio.run(try_open(missing)) == (
        f"cannot reach shuttle-firewalld at {missing}: is it running? "
        "(start it as root: shuttle-firewalld)"
    )
    # A socket file nobody listens on: the client waits out its timeout.
    stale = socket_dir / "stale.sock"
    bind = f"import socket; socket.socket(socket.AF_UNIX).bind({str(stale)!r})"
    subprocess.run(
        [sys.executable, "-c", bind],
        check=True,
        timeout=10,
    )
    assert asyncio.run(try_open(stale)) == (
        f"cannot reach shuttle-firewalld at {stale}: no answer within 1 s "
        "(is it running? start it as root: shuttle-firewalld)"
    )


def test_the_client_tells_a_stalled_firewalld_from_a_missing_one(tmp_path: Path) -> None:
    # A ROUTER that completes the handshake and never answers, as a firewalld whose loop is
    # stuck: a user is told it took the connection, not to start it.
    path = tmp_path / "stalled.sock"
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router.bind(f"ipc://{path}")
    try:
        said = asyncio.run(try_open(path, timeout=5))  # room for the handshake under load
        assert router.poll(0), "the request reached the stand-in"
    finally:
        router.close()
        context.term()
    assert said == (
        f"shuttle-firewalld at {path} took the connection but did not answer within 5 s "
        "(it is busy or stalled; try again)"
    )


# Contexts whose I/O thread a failing test left stuck: kept from the garbage collector, whose
# term() of them would hang the worker.
_STUCK: list[zmq.Context[zmq.Socket[bytes]]] = []


def test_a_connection_outliving_its_monitor_still_reconnects(tmp_path: Path) -> None:
    # The client drops its connection when firewalld restarts; until libzmq has closed it, it
    # may reconnect to the new firewalld, and the event of that must not find a closed
    # reader: it would hold the context's I/O thread, and every later connection with it.
    path = f"ipc://{tmp_path / 'firewalld.sock'}"
    context = zmq.Context()
    old = zmq.Context()  # firewalld's: its term() returns once the listener is closed
    router = old.socket(zmq.ROUTER)
    router.bind(path)
    dealer = context.socket(zmq.DEALER)
    monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    dealer.connect(path)
    assert monitor.poll(WAIT * 1000), "the first handshake"
    stop_monitor(dealer, monitor)
    old.destroy(linger=0)
    new = zmq.Context()  # firewalld restarted at the same path
    router = new.socket(zmq.ROUTER)
    router.bind(path)
    dealer.send(b"after the restart")
    arrived = router.poll(WAIT * 1000)
    new.destroy(linger=0)
    if not arrived:
        _STUCK.append(context)
    assert arrived, "the connection reconnected, and its context still works"
    context.destroy(linger=0)

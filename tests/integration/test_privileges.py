"""What firewalld lets real local users do, each as itself in the client host: a user outside
its group cannot even connect; a member cannot redirect into another user's port, capture
another user's traffic without policy, nor touch or see another user's session."""

from __future__ import annotations

import re
import signal
from typing import List

import pytest

from testbed import TARGET_NET, Shuttle, nft_tables, ready_line, shuttle_rules

pytestmark = pytest.mark.integration

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
# Run by another user: open a session into PORT through the client library, then (the kernel
# permitting) ask raw questions about the session id given, bypassing the library's checks.
PROBE = """
import asyncio, sys, zmq, msgpack
from shuttle_client.firewall_session import FirewallSession, FirewallError
from shuttle_protocol.frames import decode_frame, encode_frame
from shuttle_protocol.firewall_messages import (
    CloseSessionRequest, HeartbeatRequest, ListSessionsRequest, SetHostsRequest)
path, port, subnet, victim = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

async def main():
    client = FirewallSession(path)
    try:
        print("opened", await client.open("nft", port, [subnet], [], timeout=5))
    except FirewallError as exc:
        print(exc)
    finally:
        await client.close()

asyncio.run(main())
context = zmq.Context()
dealer = context.socket(zmq.DEALER)
dealer.linger = 0
dealer.connect("ipc://" + path)
requests = [ListSessionsRequest()]
if victim:
    requests += [HeartbeatRequest(victim), SetHostsRequest(victim, ()), CloseSessionRequest(victim)]
for number, request in enumerate(requests, 1):
    dealer.send(encode_frame(number, request))
    if not dealer.poll(3000):
        print("no answer")
        break
    print(decode_frame(dealer.recv())[1])
dealer.close()
context.term()
"""


# Run by the first user: a session into its own listener, kept alive; it prints the id.
HOLDER = """
import asyncio, socket, sys
from shuttle_client.firewall_session import FirewallSession

async def main():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = FirewallSession(sys.argv[1])
    await client.open("nft", listener.getsockname()[1], [sys.argv[2]], [])
    print("session", client.session, flush=True)
    await client.run_heartbeats()

asyncio.run(main())
"""


def probe(shuttle: Shuttle, argv_prefix: List[str], port: int, victim: str = "") -> List[str]:
    python = shuttle.venv.program("python")
    argv = [*argv_prefix, python, "-c", PROBE, str(shuttle.socket), str(port), TARGET_NET, victim]
    result = shuttle.topo.c.run(argv, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def listening_port(shuttle: Shuttle) -> int:
    match = re.search(r"\bport (\d+)", ready_line(shuttle.clients[0]))
    assert match, shuttle.outputs()
    return int(match.group(1))


def test_a_user_outside_the_group_cannot_connect(shuttle: Shuttle) -> None:
    shuttle.start_client()
    port = listening_port(shuttle)
    before = nft_tables(shuttle.topo)
    lines = probe(shuttle, NOBODY, port)
    assert lines[0].startswith(f"no permission to use shuttle-firewalld at {shuttle.socket}: ")
    assert f"members of {shuttle.topo.user.group} may" in lines[0]
    # Past the library's check: the kernel refuses the connection, nothing is answered.
    assert lines[1:] == ["no answer"]
    assert nft_tables(shuttle.topo) == before
    assert shuttle.firewalld is not None
    assert "uid 65534" not in shuttle.firewalld.output()


def test_a_member_cannot_redirect_into_another_users_port(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    shuttle.start_client()  # the first user's listener
    port = listening_port(shuttle)
    before = nft_tables(topo)
    lines = probe(shuttle, topo.user2.argv([], topo.user_env(user=topo.user2)), port)
    assert lines[0] == (
        f"shuttle-firewalld: no listening socket of uid {topo.user2.uid} on port {port} at "
        "127.0.0.1 or a wildcard address, where IPv4 connections land"
    )
    assert nft_tables(topo) == before


def test_a_member_cannot_capture_another_users_traffic_without_policy(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    args = shuttle.client_args(user=topo.user2, extra=["--user", topo.user.name])
    result = topo.run_as_user(args, user=topo.user2, timeout=60)
    assert result.returncode == 1, result.stderr
    assert (
        "shuttle-client: shuttle-firewalld: capturing other users' traffic needs root or a "
        f"policy entry in {shuttle.policy_file} (allow USER|@GROUP capture-others)\n"
    ) in result.stderr
    assert nft_tables(topo) == []


def test_a_member_cannot_touch_or_see_another_users_session(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    python = shuttle.venv.program("python")
    argv = topo.user_argv([python, "-c", HOLDER, str(shuttle.socket), TARGET_NET])
    holder = topo.start("holder", argv)
    assert holder.wait_for_line("session ", 20), holder.output()
    session = holder.output().split("session ", 1)[1].split()[0]
    other = topo.user2.argv([], topo.user_env(user=topo.user2))
    lines = probe(shuttle, other, 1, victim=session)  # the real id, which only its owner knows
    listing, *refusals = lines[1:]
    assert listing == "ListSessionsAnswer(sessions=())"
    assert refusals == ["ErrorAnswer(text='no such session')"] * 3
    assert nft_tables(topo) == [f"shuttle-{session[:12]}"]
    assert holder.alive(), holder.output()
    assert "lost" not in holder.output()
    holder.stop()
    assert shuttle.wait_rules_gone(timeout=shuttle.lease + 5) == []  # its lease ends them


# Run by a user outside the group: bind the port a killed client freed, and report whether a
# connection comes.
TAKER = """
import signal, socket, sys

def stop(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, stop)  # the test is done: say what came
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the client's TIME_WAITs
try:
    sock.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as exc:
    print("cannot bind:", exc.strerror, flush=True)
    sys.exit()
sock.listen(16)
print("bound", flush=True)
try:
    print("received a connection from", sock.accept()[1], flush=True)
except KeyboardInterrupt:
    print("received nothing", flush=True)
"""
LONG_LEASE = 60  # as a member may ask (--lease allows up to 3600 s)


@pytest.mark.parametrize("shuttle", [LONG_LEASE], indirect=True)
def test_a_killed_clients_port_takes_none_of_its_connections(shuttle: Shuttle) -> None:
    """Once a member's client is killed, anyone may bind its port; the session's rules must
    not outlive the client (its lease would keep them a minute here) and hand the member's
    connections to whoever did."""
    topo = shuttle.topo
    client = shuttle.start_client()
    port = listening_port(shuttle)
    assert topo.curl().returncode == 0, shuttle.outputs()  # captured, through the tunnel
    client.send(signal.SIGKILL)
    assert client.wait(10) == -signal.SIGKILL
    python = shuttle.venv.program("python")
    taker = topo.start("taker", topo.c.argv([*NOBODY, python, "-c", TAKER, str(port)]))
    assert taker.wait_for_line("bound", 20), taker.output()  # the port is free: anyone's
    # The rules go with the client, long before its lease would have run out.
    assert shuttle.wait_rules_gone(timeout=LONG_LEASE / 4) == []
    topo.curl()  # the member's program, as if nothing happened: no longer captured
    taker.send(signal.SIGTERM)
    assert taker.wait(10) == 0, taker.output()
    assert taker.output().splitlines()[-1] == "received nothing"
    assert shuttle_rules(topo) == []

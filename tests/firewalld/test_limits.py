"""No member can stall, bloat or crash firewalld: the real daemon in a namespace, a member
(nobody) doing its worst, and another member's real client keeping its session and its
traffic all along; and the server's loop in this process, made to stop listening by a burst
of connections, still serving the connection made before.

Times are measured and printed (pytest -s shows them), never asserted: the assertions are
that every heartbeat was answered within the lease, that the other member's captured
connections kept reaching its listener, that firewalld's peak RSS stayed under the bound
docs/firewalld.md states, and that firewalld never fell over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from shuttle_firewalld.policy import Policy
from shuttle_firewalld.server import Server
from shuttle_firewalld.sessions import Sessions
from shuttle_protocol.firewall_messages import ListSessionsAnswer, ListSessionsRequest
from shuttle_protocol.frames import decode_frame, encode_frame

from .daemon import NOBODY, Daemon, shuttle_tables
from .fakes import POLICY_PATH, FakeMethod

RSS_BOUND_MIB = 200  # docs/firewalld.md, "Limits"
FLOOD_SECONDS = 60.0  # the issue asks for a minute
LEASE = 2.0
# Another member: its own uid, in firewalld's group (nogroup) as nobody is.
VICTIM = ["setpriv", "--reuid=65533", "--regid=65534", "--clear-groups"]

# The other member's client: a listener, a real FirewallSession (nft) capturing its own
# connections to 198.18.0.0/15 into it, today's heartbeat task, and every 0.2 s a captured
# connection that must reach the listener. It also times a quick request (ListSessions, on a
# second connection) for the report. It prints "ready", then one JSON line at the end.
VICTIM_CLIENT = """\
import asyncio, json, socket, sys, time
from shuttle_client.firewall_session import FirewallError, FirewallSession

path, seconds = sys.argv[1], float(sys.argv[2])

async def main():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 12310))
    listener.listen(64)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    client, timer = FirewallSession(path), FirewallSession(path)
    await client.open("nft", 12310, [("198.18.0.0/15", 1, 65535)], [])
    await timer.list_sessions()  # connected before the other member starts: see GRAB
    print("ready", flush=True)
    heartbeats = asyncio.ensure_future(client.run_heartbeats())
    result = {"connected": 0, "failed": [], "lost": None, "times": [], "connect times": []}
    end = time.monotonic() + seconds
    for _ in range(int(seconds / 0.2) + 1):
        if time.monotonic() >= end or heartbeats.done():
            break
        conn = socket.socket()
        conn.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(conn, ("198.18.0.5", 80)), 2)
            accepted, _ = await asyncio.wait_for(loop.sock_accept(listener), 2)
            accepted.close()
            result["connected"] += 1
        except (OSError, asyncio.TimeoutError) as exc:
            result["failed"].append(type(exc).__name__)
        finally:
            conn.close()
        started = time.monotonic()
        await timer.list_sessions(timeout=LEASE)
        result["times"].append(time.monotonic() - started)
        # A new connection: its ZAP handshake, then its first answer.
        started, fresh = time.monotonic(), FirewallSession(path)
        try:
            await fresh.list_sessions(timeout=LEASE)
        finally:
            await fresh.close()
        result["connect times"].append(time.monotonic() - started)
        await asyncio.sleep(0.2)
    if heartbeats.done():
        result["lost"] = str(heartbeats.exception())
    heartbeats.cancel()
    result["sessions"] = len(await timer.list_sessions())
    await client.close()
    await timer.close()
    print(json.dumps(result), flush=True)

LEASE = float(sys.argv[3])
asyncio.run(main())
"""

# The flooding member: its own nft session, kept busy with the largest update it may send
# (50,000 subnets and 50,000 excludes) on three connections at once, and 4 MiB frames (over
# a member's limit) on eight more that never read an answer. Prints its tally as JSON.
FLOOD = """\
import asyncio, ipaddress, json, socket, sys, time
import zmq
from shuttle_client.firewall_session import FirewallSession
from shuttle_protocol.firewall_messages import UpdateSessionRequest
from shuttle_protocol.frames import MAX_FRAME, decode_frame, encode_frame

path, seconds = sys.argv[1], float(sys.argv[2])
listener = socket.socket()
listener.bind(("127.0.0.1", 12311))
listener.listen()
first = 0x0A000000
subnets = tuple((str(ipaddress.ip_network((first + i * 256, 24))), 1, 65535) for i in range(50000))
excludes = tuple((f"{ipaddress.ip_address(first + 7 + i * 256)}/32", 80, 90) for i in range(50000))
update = encode_frame(1, UpdateSessionRequest("f" * 32, subnets, excludes))
client = FirewallSession(path)  # opened only now, lest its lease run out meanwhile
asyncio.run(client.open("nft", 12311, [("10.0.0.0/8", 1, 65535)], []))
update = update.replace(b"f" * 32, client.session.encode(), 1)
context = zmq.Context()
workers = [context.socket(zmq.DEALER) for _ in range(3)]
hogs = [context.socket(zmq.DEALER) for _ in range(8)]
hog = b"\\x00" * MAX_FRAME
for sock in workers + hogs:
    sock.linger = 0
    sock.sndhwm = 2  # the flooder's own memory: firewalld's is what the test looks at
    sock.connect("ipc://" + path)
for sock in workers:
    sock.send(update)
tally = {"sizes": [len(update)], "answers": {}, "hog frames": 0}
end = time.monotonic() + seconds
poller = zmq.Poller()
for sock in workers:
    poller.register(sock, zmq.POLLIN)
for _ in range(int(seconds * 1000)):
    if time.monotonic() >= end:
        break
    for sock in hogs:
        try:
            sock.send(hog, zmq.NOBLOCK)
            tally["hog frames"] += 1
        except zmq.Again:
            pass
    for sock, _ in poller.poll(100):
        _, reply = decode_frame(sock.recv())
        kind = getattr(reply, "text", type(reply).__name__)[:40]
        tally["answers"][kind] = tally["answers"].get(kind, 0) + 1
        sock.send(update)
for sock in workers + hogs:
    sock.close()
print(json.dumps(tally), flush=True)
"""


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def member(netns: str, who: list[str], script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, *who, sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def beside_another(
    netns: str, daemon: Daemon, seconds: float, script: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the other member's client for seconds and, once its session is open, script as
    nobody beside it; what each printed last (as JSON), when both ended well."""
    path = str(daemon.socket_path)
    victim = member(netns, VICTIM, VICTIM_CLIENT, path, str(seconds), str(LEASE))
    other = None
    try:
        assert victim.stdout is not None
        assert victim.stdout.readline().strip() == "ready", "the other member's client failed"
        other = member(netns, NOBODY, script, path, str(seconds))
        victim_out, victim_err = victim.communicate(timeout=seconds + 60)
        other_out, other_err = other.communicate(timeout=60)
    finally:
        for proc in (victim, other):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert victim.returncode == 0, victim_err + "\nfirewalld:\n" + daemon.log
    assert other.returncode == 0, other_err
    return json.loads(victim_out), json.loads(other_out)


@pytest.mark.integration
def test_a_members_flood_stalls_nobody_and_bloats_nothing(
    netns: str, routed: str, start_firewalld: Callable[..., Daemon]
) -> None:
    daemon = start_firewalld(group="nogroup", lease=LEASE)
    result, tally = beside_another(netns, daemon, FLOOD_SECONDS, FLOOD)
    rss = peak_rss_mib(daemon.proc.pid)
    for kind in ("times", "connect times"):  # a figure to read, not asserted
        times = sorted(result.pop(kind))
        print(
            f"\n{kind} during the flood: {len(times)}, median {times[len(times) // 2]:.3f} s, "
            f"90% {times[len(times) * 9 // 10]:.3f} s, 99% {times[len(times) * 99 // 100]:.3f} s, "
            f"max {times[-1]:.3f} s"
        )
    print(f"firewalld's peak RSS {rss:.0f} MiB; the flood: {tally}")
    # Every heartbeat of the other member was answered within its lease, its session held,
    # and each of its captured connections reached its listener, for the whole minute.
    assert result["lost"] is None
    assert result["failed"] == []
    assert result["connected"] >= FLOOD_SECONDS / 2  # one every 0.2 s or so: not cut short
    assert result["sessions"] == 1
    # The flood was real: updates of that size were applied, others answered busy at once.
    assert tally["answers"].get("UpdateSessionAnswer", 0) >= 1
    assert any(kind.startswith("busy: uid 65534") for kind in tally["answers"])
    assert tally["hog frames"] >= 8
    assert "refused a frame of 4194304 bytes from uid 65534" in daemon.log
    assert rss < RSS_BOUND_MIB
    assert daemon.proc.poll() is None
    assert shuttle_tables(netns) != []  # the flooder's session, until its lease runs out


# A member grabbing what descriptors it can: reply sockets of a tproxy session of its own,
# asked for and never fetched (firewalld holds each until its token expires), raw
# connections to the zmq socket that never say a word, zmq connections that each ask
# something, connections to the fd socket; all held. Prints how many of each it made, and
# the answers to its reply socket requests. (While it holds them, firewalld may stop
# listening for moments: connections made before go on.)
GRAB = """\
import asyncio, json, socket, sys, time
import zmq
from shuttle_client.firewall_session import FirewallSession
from shuttle_protocol.firewall_messages import (
    HeartbeatRequest, ListSessionsRequest, ReplySocketRequest
)
from shuttle_protocol.frames import decode_frame, encode_frame

path, seconds = sys.argv[1], float(sys.argv[2])
held, made = [], {"raw": 0, "fds": 0, "zmq": 0, "replies": {}}
client = FirewallSession(path)
asyncio.run(client.open("tproxy", 1, [("198.18.0.0/15", 1, 65535)], []))
context = zmq.Context()
asker = context.socket(zmq.DEALER)
asker.connect("ipc://" + path)
program = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the flows' program: its own
program.bind(("198.18.0.1", 0))
program_port = program.getsockname()[1]
for port in range(1000, 1300):
    # Its lease is 2 s, and 64 reply sockets took longer than that on a loaded machine.
    asker.send(encode_frame(1, HeartbeatRequest(client.session)))
    if asker.poll(5000):
        asker.recv()
    request = ReplySocketRequest(client.session, "198.18.0.5", port, "198.18.0.1", program_port)
    asker.send(encode_frame(port, request))
    if asker.poll(5000):
        reply = decode_frame(asker.recv())[1]
        kind = getattr(reply, "text", type(reply).__name__)[:60]
        made["replies"][kind] = made["replies"].get(kind, 0) + 1
for kind, where, count in (("raw", path, 1200), ("fds", path + ".fds", 100)):
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX)
        sock.setblocking(False)
        try:
            sock.connect(where)
            made[kind] += 1
        except OSError:
            pass
        held.append(sock)
for _ in range(300):
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect("ipc://" + path)
    dealer.send(encode_frame(1, ListSessionsRequest()), zmq.NOBLOCK)
    held.append(dealer)
    made["zmq"] += 1
time.sleep(seconds)
print(json.dumps(made), flush=True)
"""
FILE_LIMIT = 512  # firewalld's, lowered with prlimit as the review did


@pytest.mark.integration
def test_a_member_grabbing_descriptors_cannot_crash_firewalld(
    netns: str, routed: str, start_firewalld: Callable[..., Daemon]
) -> None:
    daemon = start_firewalld(
        group="nogroup", lease=LEASE, wrap=["prlimit", f"--nofile={FILE_LIMIT}", "--"]
    )
    assert f"at most {FILE_LIMIT // 16} connections, {FILE_LIMIT // 8} tokens" in daemon.log
    result, made = beside_another(netns, daemon, 10.0, GRAB)
    pauses = daemon.log.count("until some connections end")
    print(
        f"\nthe grab: {made}; the other member: {result['connected']} connections; {pauses} pauses"
    )
    assert made["raw"] + made["zmq"] > FILE_LIMIT  # more than firewalld could ever hold
    tokens = FILE_LIMIT // 8
    full = f"firewalld holds {tokens} sockets for tokens not used yet; try again"[:60]
    assert made["replies"] == {"ReplySocketAnswer": tokens, full: 300 - tokens}
    assert f"{tokens} tokens are out, the most this firewalld holds" in daemon.log
    assert result["lost"] is None
    assert result["failed"] == []
    assert result["sessions"] == 1
    assert "refused a connection of uid 65534: uid 65534 has 8 connections already" in daemon.log
    assert daemon.proc.poll() is None


def listed(dealer: zmq.Socket[bytes], request_id: int) -> bool:
    """Whether a ListSessions on this connection is answered within 5 s."""
    dealer.send(encode_frame(request_id, ListSessionsRequest()))
    if not dealer.poll(5000):
        return False
    return decode_frame(dealer.recv()) == (request_id, ListSessionsAnswer(()))


def closed_door(path: str) -> bool:
    """Whether a connection to path is refused now."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return True
    return False


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory short enough for the paused socket's path (sun_path holds 107 bytes;
    pytest's tmp_path may be longer than that on its own), as /run/shuttle is."""
    made = Path(tempfile.mkdtemp(prefix="fwl-", dir="/tmp"))
    yield made
    shutil.rmtree(made, ignore_errors=True)


def test_not_listening_for_a_while_keeps_every_connection_made(short_dir: Path) -> None:
    """The server's own loop, in this process, under an open file limit just above what it
    uses: a burst of connections makes it stop listening, and the connection made before
    is still answered all along (zmq's unbind, used before, ended it), until it listens
    again."""
    tmp_path = short_dir
    path = str(tmp_path / "firewalld.sock")
    # What a run that ended while not listening left: removed at start.
    (tmp_path / ".firewalld.sock.paused-old").mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(tmp_path / ".firewalld.sock.paused-old" / "firewalld.sock"))
    sessions = Sessions({"nft": FakeMethod()}, 6.0, policy=Policy(POLICY_PATH))
    # Five eighths of it (where listening resumes) leave 40 descriptors for the server and
    # the first connection; three quarters (where it stops) a few dozen more.
    limit = (len(os.listdir("/proc/self/fd")) + 40) * 8 // 5
    server = Server(path, os.getgid(), sessions, max_connections=limit, file_limit=limit)
    assert sorted(os.listdir(tmp_path)) == ["firewalld.sock"]
    stop = threading.Event()
    loop = threading.Thread(target=server.run, args=(stop.is_set,))
    loop.start()
    context = zmq.Context()
    first, later = context.socket(zmq.DEALER), context.socket(zmq.DEALER)
    burst: list[socket.socket] = []
    try:
        first.linger = later.linger = 0
        first.connect("ipc://" + path)
        assert listed(first, 1)
        for _ in range(limit):  # never more than the limit: each is two descriptors here
            sock = socket.socket(socket.AF_UNIX)
            burst.append(sock)
            try:
                sock.connect(path)
            except (FileNotFoundError, ConnectionRefusedError):
                break  # the door is closed
        for _ in range(50):  # the loop's look at its descriptors; 5 s at most
            if not closed_door(path):
                time.sleep(0.1)
        assert closed_door(path)
        assert listed(first, 2)
        assert not os.path.exists(path)  # a new client is told firewalld is not running
        for sock in burst:
            sock.close()
        for _ in range(100):  # libzmq's news of the ends, then the loop's look; 10 s at most
            if os.path.exists(path):
                break
            time.sleep(0.1)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        later.connect("ipc://" + path)
        assert listed(later, 3)
        assert listed(first, 4)
    finally:
        for sock in burst:
            sock.close()
        first.close()
        later.close()
        context.term()
        stop.set()
        loop.join(10)
        server.close()
    assert os.listdir(tmp_path) == []


def test_a_burst_while_the_loop_is_busy_meets_a_closed_door(short_dir: Path) -> None:
    """While the loop is held up (here: in its ZAP handler, as a slow request or a loaded
    machine would), a burst of connections still makes the server stop listening before
    libzmq's accepts reach the limit: the door keeper looks whenever one waits. The loop
    looked only between the things it served, and libzmq, out of descriptors, aborts."""
    path = str(short_dir / "firewalld.sock")
    holding, busy, release, returned = (threading.Event() for _ in range(4))

    def admit(peer: Any) -> str | None:
        if holding.is_set():
            busy.set()
            release.wait(20)  # bounded: the test releases it
            returned.set()
        return None

    sessions = Sessions({"nft": FakeMethod()}, 6.0, policy=Policy(POLICY_PATH))
    limit = (len(os.listdir("/proc/self/fd")) + 40) * 8 // 5
    server = Server(
        path, os.getgid(), sessions, max_connections=limit, file_limit=limit, admit=admit
    )
    stop = threading.Event()
    loop = threading.Thread(target=server.run, args=(stop.is_set,))
    loop.start()
    context = zmq.Context()
    staller = context.socket(zmq.DEALER)
    burst: list[socket.socket] = []
    try:
        staller.linger = 0
        holding.set()
        staller.connect("ipc://" + path)
        assert busy.wait(10), "the loop never asked the ZAP handler"
        for _ in range(limit):
            sock = socket.socket(socket.AF_UNIX)
            burst.append(sock)
            try:
                sock.connect(path)
            except (FileNotFoundError, ConnectionRefusedError):
                break
        for _ in range(50):  # 5 s at most, the loop held all along
            if not closed_door(path):
                time.sleep(0.1)
        assert closed_door(path)
        assert not returned.is_set(), "the loop was not held all along"
    finally:
        holding.clear()
        release.set()
        for sock in burst:
            sock.close()
        staller.close()
        context.term()
        stop.set()
        loop.join(10)
        server.close()

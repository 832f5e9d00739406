"""The control socket of a real running client, through `shuttle-client ctl` as its user:
status, connections with their bytes, watch, events, routes added and removed while it runs
(captured at once, no restart; removed ones no more), refusals, stop; and who may not
connect (root, by ZAP; another user, by the directory), and a killed client's socket."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any, List

import pytest
import zmq
from shuttle_client.control_client import ControlClient, ControlClientError
from shuttle_protocol.control_messages import StatusRequest
from shuttle_protocol.frames import encode_frame

from testbed import ECHO_PORT, S_ADDR_C, SYSTEM_PYTHON, T_ADDR, T_ADDR2, TARGET_NET, Shuttle
from testbed.procs import Proc, wait_until
from testbed.user import LocalUser

from .checks import TUNNEL_WAIT, assert_echo, assert_not_captured, assert_page
from .ctl import WAIT, ctl, ctl_json

pytestmark = pytest.mark.integration

HELD_BYTES = 3000
# Connects, has HELD_BYTES echoed, says so, and keeps the connection open until stopped.
HOLDER = """\
import socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with socket.create_connection((host, port), timeout=20) as sock:
    payload = b"x" * size
    sock.sendall(payload)
    got = b""
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        if not chunk:
            break
        got += chunk
    print("echoed" if got == payload else f"short echo: {len(got)} bytes", flush=True)
    time.sleep(60)
"""


def control_path(shuttle: Shuttle) -> Path:
    """The default control socket of the first test user's client."""
    return shuttle.topo.home().runtime_dir / "shuttle" / "control.sock"


def hold_connection(shuttle: Shuttle) -> Proc:
    """A program of the test user with an echoed connection to T_ADDR held open."""
    topo = shuttle.topo
    script = topo.write_user_file("holder.py", HOLDER)
    argv = topo.user_argv([SYSTEM_PYTHON, str(script), T_ADDR, str(ECHO_PORT), str(HELD_BYTES)])
    holder = topo.start("holder", argv)
    assert holder.wait_for_line("echoed", TUNNEL_WAIT), holder.describe() + shuttle.outputs()
    return holder


def held(connections: List[dict[str, Any]]) -> List[dict[str, Any]]:
    return [c for c in connections if (c["host"], c["port"]) == (T_ADDR, ECHO_PORT)]


def test_routes_added_and_removed_are_captured_at_once(shuttle: Shuttle, method: str) -> None:
    shuttle.start_client(subnets=[f"{T_ADDR}/32"], method=method)
    routes = ctl_json(shuttle, "routes")
    assert routes["subnets"] == [f"{T_ADDR}/32"]
    assert f"{S_ADDR_C}/32" in routes["excludes"]  # the ssh server's own, automatically
    assert_not_captured(shuttle, T_ADDR2)

    added = ctl_json(shuttle, "add", f"{T_ADDR2}/32")
    assert added["subnets"] == [f"{T_ADDR}/32", f"{T_ADDR2}/32"]
    assert_page(shuttle, T_ADDR2)

    excluded = ctl_json(shuttle, "add", "-x", f"{T_ADDR2}/32")
    assert f"{T_ADDR2}/32" in excluded["excludes"]
    assert_not_captured(shuttle, T_ADDR2)
    ctl_json(shuttle, "remove", "-x", f"{T_ADDR2}/32")
    assert_page(shuttle, T_ADDR2)

    removed = ctl_json(shuttle, "remove", f"{T_ADDR2}/32")
    assert removed["subnets"] == [f"{T_ADDR}/32"]
    assert ctl_json(shuttle, "routes") == {**routes, "subnets": [f"{T_ADDR}/32"]}
    assert_not_captured(shuttle, T_ADDR2)
    assert_page(shuttle, T_ADDR)  # the rest is captured as before


def test_refused_changes_say_why_and_change_nothing(shuttle: Shuttle) -> None:
    shuttle.start_client(subnets=[TARGET_NET])
    before = ctl_json(shuttle, "routes")
    refusals = {
        ("remove", "10.9.0.0/16"): "not in the routes: 10.9.0.0/16",
        ("remove", "-x", f"{S_ADDR_C}/32"): "is the ssh server's",
        ("remove", TARGET_NET): "that would capture nothing",
    }
    for args, text in refusals.items():
        result = ctl(shuttle, *args)
        assert result.returncode == 1, f"ctl {args}: {result}"
        assert result.stdout == ""
        [line] = result.stderr.splitlines()
        assert line.startswith("shuttle-client ctl: the client said: ") and text in line, line
    assert ctl_json(shuttle, "routes") == before
    usage = ctl(shuttle, "add", "300.1.2.3")
    assert usage.returncode == 2, usage
    assert usage.stderr == "shuttle-client ctl: error: invalid subnet '300.1.2.3': " + (
        "300.1.2.3 is not a network\n"
    )
    assert_page(shuttle, T_ADDR)


def test_status_connections_and_watch_show_a_held_connection(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    # The agent's path: its channels are what the listing and the events describe here
    # (the fast path's rows, tcp-ssh, are test_fastpath's).
    shuttle.start_client(subnets=[TARGET_NET], extra=["--tcp=agent"])
    status = ctl_json(shuttle, "status")
    assert status["state"] == "up"
    assert status["remote"] == f"{topo.user.name}@{S_ADDR_C}"
    assert status["method"] in ("nft", "nat")
    assert (status["streams_up"], status["streams"]) == (1, 1)

    holder = hold_connection(shuttle)
    [connection] = held(ctl_json(shuttle, "connections")["connections"])
    assert connection["proto"] == "tcp"
    assert (connection["bytes_up"], connection["bytes_down"]) == (HELD_BYTES, HELD_BYTES)
    status = ctl_json(shuttle, "status")
    assert status["channels"] >= 1
    assert status["bytes_up"] >= HELD_BYTES and status["bytes_down"] >= HELD_BYTES

    table = ctl(shuttle, "connections")
    assert table.returncode == 0, table
    [row] = [line for line in table.stdout.splitlines() if f"{T_ADDR}:{ECHO_PORT}" in line]
    assert row.split()[2] == "tcp" and "2.9 KiB  2.9 KiB" in row, table.stdout

    watch = ctl(shuttle, "watch", "--interval=0.2", "--count=2")
    assert watch.returncode == 0, watch
    tables = watch.stdout.split("\n\n")
    assert len(tables) == 3 and tables[2] == "", watch.stdout
    for text in tables[:2]:
        lines = text.splitlines()
        assert "shuttle-client pid" in lines[0] and ": up, " in lines[0], text
        assert any(f"{T_ADDR}:{ECHO_PORT}" in line for line in lines[2:-1]), text
        assert lines[-1].split()[0] == "total", text

    holder.stop()
    gone = wait_until(lambda: not held(ctl_json(shuttle, "connections")["connections"]), WAIT)
    assert gone, f"the closed connection is still listed\n{shuttle.outputs()}"
    assert ctl_json(shuttle, "status")["bytes_up"] >= HELD_BYTES  # closed ones still count


def test_events_report_channels_opened_and_closed(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    shuttle.start_client(subnets=[TARGET_NET], extra=["--tcp=agent"])
    program = shuttle.venv.program("shuttle-client")
    argv = [program, "ctl", "--json", "events", "--count=2", f"--timeout={WAIT}"]
    events = topo.start("events", topo.user_argv(argv))
    # When its subscription reaches the client is not knowable: make connections until two
    # events have come.
    for _ in range(20):
        assert_echo(shuttle, T_ADDR)
        if events.wait(0.5) is not None:
            break
    code = events.wait(WAIT)
    assert code == 0, events.describe() + shuttle.outputs()
    got = [json.loads(line) for line in events.output().splitlines() if line.startswith("{")]
    assert len(got) == 2, events.output()
    assert {event["event"] for event in got} <= {"channel_opened", "channel_closed"}, got
    assert got[1]["sequence"] == got[0]["sequence"] + 1
    for event in got:
        if event["event"] == "channel_opened":
            assert (event["proto"], event["host"], event["port"]) == ("tcp", T_ADDR, ECHO_PORT)
        else:
            assert event["bytes_up"] > 0 and event["bytes_down"] == event["bytes_up"], event


def test_stop_ends_the_client_and_its_socket(shuttle: Shuttle) -> None:
    client = shuttle.start_client(subnets=[TARGET_NET])
    result = ctl(shuttle, "stop")
    assert (result.returncode, result.stdout) == (0, "the client is stopping\n"), result
    assert client.wait(WAIT) == 0, shuttle.outputs()
    assert shuttle.wait_rules_gone() == []
    after = ctl(shuttle, "status")
    assert after.returncode == 1
    assert "no shuttle-client is running at" in after.stderr, after.stderr
    assert not control_path(shuttle).exists()


def test_only_the_clients_own_uid_gets_answers(shuttle: Shuttle, second_user: LocalUser) -> None:
    client = shuttle.start_client(subnets=[TARGET_NET])
    path = str(control_path(shuttle))
    uid = shuttle.topo.user.uid

    # Root may open the socket file, but ControlClient sees whose it is before it connects.
    with pytest.raises(ControlClientError) as caught, ControlClient(path, WAIT) as root:
        root.status()
    assert str(caught.value) == (
        f"the socket {path} is not ours: uid {uid} listens there, and a shuttle-client "
        "answers its own uid only"
    )

    # A raw zmq connection from root gets past the file: the client's ZAP handler refuses it.
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    try:
        sock.connect("ipc://" + path)
        sock.send(encode_frame(1, StatusRequest()))
        refused = "control socket: refused a connection: uid 0 may not control"
        assert wait_until(lambda: refused in client.output(), WAIT), shuttle.outputs()
        assert not sock.poll(500), "root got an answer"
    finally:
        sock.close(linger=0)

    # Another user does not even get to the socket: the directory is the user's alone.
    other = ctl(shuttle, f"--control={path}", "status", user=second_user)
    assert other.returncode == 1
    assert other.stderr == f"shuttle-client ctl: cannot reach {path}: Permission denied\n"
    assert ctl_json(shuttle, "status")["state"] == "up"  # and the owner is still served


def test_a_killed_clients_socket_is_named_and_taken_over(shuttle: Shuttle) -> None:
    client = shuttle.start_client(subnets=[TARGET_NET])
    client.send(signal.SIGKILL)
    assert client.wait(WAIT) == -signal.SIGKILL
    result = ctl(shuttle, "status")
    assert result.returncode == 1
    assert result.stderr == (
        f"shuttle-client ctl: no shuttle-client is running at {control_path(shuttle)} "
        "(its socket was left behind)\n"
    )
    shuttle.start_client(subnets=[TARGET_NET])  # a new client removes the stale socket
    assert ctl_json(shuttle, "status")["state"] == "up"

"""ControlClient and control_paths: the default paths, the checks before connecting (what a
missing, stale or foreign socket says), and round trips with the client's real
ControlServer (answers, refusals, late answers, time-outs, events with their numbers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import zmq
from shuttle_client.control_client import ControlClient, ControlClientError, to_targets
from shuttle_client.control_paths import default_control_path, events_path
from shuttle_protocol.control_messages import (
    ChannelClosed,
    ChannelOpened,
    Connected,
    HostsRequest,
    StatusAnswer,
    StatusRequest,
)
from shuttle_protocol.frames import decode_frame, encode_frame

from .control_server import CONNECTIONS, STATUS, running_server, short_directory

WAIT = 5.0  # bound on anything that should happen at once


# -- paths -----------------------------------------------------------------------------


def test_default_path_is_in_the_runtime_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_control_path() == "/run/user/1000/shuttle/control.sock"


@pytest.mark.parametrize("value", [None, "", "relative/dir"])
def test_without_a_runtime_directory_it_is_per_uid_in_tmp(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", value)
    assert default_control_path() == f"/tmp/shuttle-{os.getuid()}/control.sock"


def test_events_socket_is_beside_the_request_socket() -> None:
    assert events_path("/run/user/1000/shuttle/control.sock") == (
        "/run/user/1000/shuttle/control.sock.events"
    )


def test_a_client_without_a_path_uses_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert ControlClient().path == "/run/user/1000/shuttle/control.sock"


# -- targets ---------------------------------------------------------------------------


def test_targets_from_text_and_tuples_in_order_once_each() -> None:
    assert to_targets(["10.1.0.0/16", ("10.2.0.0/16", 80, 90), "[fd00::]/64:80-90"]) == (
        ("10.1.0.0/16", 1, 65535),
        ("10.2.0.0/16", 80, 90),
        ("fd00::/64", 80, 90),
    )
    assert to_targets(["10.1.2.3", "10.1.2.3/32"]) == (("10.1.2.3/32", 1, 65535),)


def test_a_single_string_is_one_subnet() -> None:
    assert to_targets("10.1.0.0/16:443") == (("10.1.0.0/16", 443, 443),)


def test_a_bad_subnet_is_a_control_client_error() -> None:
    with pytest.raises(ControlClientError, match=r"invalid subnet '10\.0\.0\.0/33'"):
        to_targets(["10.0.0.0/33"])


def test_nothing_to_add_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    # No socket at the path: had it tried to connect, the error would say so instead.
    client = ControlClient(str(tmp_path / "none.sock"))
    with pytest.raises(ControlClientError, match="nothing to change"):
        client.add([])


# -- before connecting -----------------------------------------------------------------


def test_no_socket_file_says_no_client_runs_there(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with ControlClient(str(path)) as client, pytest.raises(ControlClientError) as caught:
        client.status()
    assert str(caught.value) == (
        f"no shuttle-client is running at {path} (no such socket; started with another --control?)"
    )


def test_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("")
    with pytest.raises(ControlClientError, match=r"is not a socket$"):
        ControlClient(str(path)).status()


def test_a_socket_left_behind_by_a_dead_client(tmp_path: Path) -> None:
    with short_directory() as directory:
        path = str(directory / "control.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(path)  # bound, never listening: as a killed process leaves the file
        with pytest.raises(ControlClientError, match="its socket was left behind"):
            ControlClient(path).status()


def test_the_events_socket_is_checked_too(tmp_path: Path) -> None:
    with pytest.raises(ControlClientError, match=r"no shuttle-client is running at .*\.events "):
        ControlClient(str(tmp_path / "control.sock")).events(timeout=0.1)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to listen as another uid")
def test_a_socket_another_uid_listens_on_is_not_ours() -> None:
    nobody = 65534
    directory = Path(tempfile.mkdtemp(prefix="ctl-"))
    path = directory / "control.sock"
    os.chown(directory, nobody, nobody)
    listener = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.bind({str(path)!r})\n"
        "s.listen()\n"
        "print('listening', flush=True)\n"
        "time.sleep(30)\n"
    )
    argv = [sys.executable, "-c", listener]
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups", *argv],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "listening"
        with pytest.raises(ControlClientError) as caught:
            ControlClient(str(path)).status()
        assert str(caught.value) == (
            f"the socket {path} is not ours: uid {nobody} listens there, and a shuttle-client "
            "answers its own uid only"
        )
    finally:
        proc.kill()
        proc.wait(WAIT)
        if proc.stdout is not None:
            proc.stdout.close()
        path.unlink(missing_ok=True)
        directory.rmdir()


# -- with the client's control server ---------------------------------------------------


def test_each_request_gets_its_answer() -> None:
    with running_server() as server, ControlClient(server.path, WAIT) as client:
        assert client.status() == STATUS
        assert client.connections() == CONNECTIONS
        routes = client.routes()
        assert (routes.subnets, routes.excludes, routes.dns) == (
            (("10.1.0.0/16", 1, 65535),),
            (),
            ("10.1.0.53",),
        )
        assert client.hosts().hosts == (("db.internal", "10.1.0.7"),)
        client.stop()
        assert server.table.stops == 1


def test_add_and_remove_send_the_parsed_targets() -> None:
    with running_server() as server, ControlClient(server.path, WAIT) as client:
        added = client.add(["10.2.0.0/16:80-90"], excludes=["10.1.9.0/24"])
        assert added.subnets == (("10.1.0.0/16", 1, 65535), ("10.2.0.0/16", 80, 90))
        assert added.excludes == (("10.1.9.0/24", 1, 65535),)
        removed = client.remove([("10.1.0.0/16", 1, 65535)], excludes="10.1.9.0/24")
        assert removed.subnets == (("10.2.0.0/16", 80, 90),)
        assert removed.excludes == ()


def test_a_refusal_is_the_clients_text() -> None:
    with running_server() as server, ControlClient(server.path, WAIT) as client:
        with pytest.raises(ControlClientError) as caught:
            client.remove(["10.9.0.0/16"])
        assert str(caught.value) == "the client said: not captured: 10.9.0.0/16"
        assert client.status() == STATUS  # and the connection serves on


def test_no_answer_in_time_says_so_and_a_late_answer_is_dropped() -> None:
    with running_server() as server:
        table = server.table
        server.event(HostsRequest, table.held)
        server.event(HostsRequest, table.answered)
        with ControlClient(server.path, timeout=0.2) as client:
            with pytest.raises(ControlClientError) as caught:
                client.hosts()
            assert str(caught.value) == (
                f"no answer from the client at {server.path} within 0.2 s: it is busy or hung, "
                "or it refused us (only the uid that runs it may connect)"
            )
            # The late hosts answer goes out first; the status request must skip it.
            server.set(table.held[HostsRequest])
            server.call(table.answered[HostsRequest].wait)
            client.timeout = WAIT
            assert client.status() == STATUS


def test_a_client_that_went_away() -> None:
    with running_server() as server, ControlClient(server.path, timeout=0.5) as client:
        assert client.status() == STATUS
        server.close()
        with pytest.raises(ControlClientError, match="has gone"):
            client.status()


def test_events_come_numbered_one_by_one() -> None:
    opened = ChannelOpened(7, 0, "tcp", "127.0.0.1:50000", "10.1.0.5", 80)
    with running_server() as server, ControlClient(server.path, WAIT) as client:
        first = None
        deadline = time.monotonic() + WAIT
        # The subscription reaches the server a moment after events() returns; until then
        # nothing is published, so keep publishing until one comes through.
        while first is None and time.monotonic() < deadline:
            server.publish(Connected(0, "alice@gw.example"))
            try:
                first = next(client.events(timeout=0.05))
            except ControlClientError:
                continue
        assert first is not None, "no event came through"
        assert first[1] == Connected(0, "alice@gw.example")
        server.publish(opened)
        server.publish(ChannelClosed(7, 0, 10, 20))
        events = client.events(timeout=WAIT)
        # Connected events published before the first one came may still be queued.
        pairs = [next(events)]
        while isinstance(pairs[-1][1], Connected):
            pairs = [next(events)]
        pairs.append(next(events))
        assert [event for _, event in pairs] == [opened, ChannelClosed(7, 0, 10, 20)]
        assert pairs[1][0] == pairs[0][0] + 1
        assert pairs[0][0] > first[0]


def test_no_event_in_time() -> None:
    with running_server() as server, ControlClient(server.path, WAIT) as client:
        events = client.events(timeout=0.1)
        with pytest.raises(ControlClientError, match=r"no event from the client at .* in 0\.1 s$"):
            next(events)


def test_requests_are_numbered_and_the_socket_is_reused() -> None:
    with running_server() as server, ControlClient(server.path, WAIT) as client:
        for _ in range(3):
            assert client.status() == STATUS
        next_call = client._caller.call(StatusRequest(), StatusAnswer)
        assert decode_frame(next_call.frame())[0] == 4  # 1, 2, 3 went before
        client.close()
        assert client.status() == STATUS  # after close(), it connects again


def test_status_request_round_trip_uses_one_frame() -> None:
    # What the docs promise a script in another language: one frame, [id, tag], answered.
    with running_server() as server:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        try:
            sock.connect("ipc://" + server.path)
            sock.send(encode_frame(41, StatusRequest()))
            assert sock.poll(int(WAIT * 1000))
            assert decode_frame(sock.recv()) == (41, STATUS)
        finally:
            sock.close(linger=0)

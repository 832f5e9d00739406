"""The control server's own rules, on real ipc sockets: it removes only the socket files it
made, never takes a live client's path, handles at most MAX_BUSY requests at once, and
answers whatever frames come (hypothesis) through the client's real request table."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
from pathlib import Path
from typing import Awaitable, Callable, Dict, List, Optional

import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shuttle_client.cli import parse_args
from shuttle_client.control import (
    MAX_BUSY,
    ControlInUse,
    ControlServer,
    ControlSetupError,
    lock_path,
)
from shuttle_client.control_requests import Running, handler
from shuttle_client.firewall_session import FirewallSession
from shuttle_client.streams import Streams
from shuttle_protocol import control_messages as cm
from shuttle_protocol.control_messages import (
    REQUESTS,
    ControlError,
    StatusAnswer,
    StatusRequest,
    StopAnswer,
    StopRequest,
)
from shuttle_protocol.errors import RemoteProtocolError
from shuttle_protocol.frames import MAX_REQUEST_ID, decode_frame, encode_frame
from shuttle_protocol.rpc import request_id_of
from shuttle_protocol.schema import Message

from .control_server import running_server

WAIT = 10.0


async def answer_stop(request: Message) -> Message:
    return StopAnswer()


def private_dir(tmp_path: Path) -> Path:
    path = tmp_path / "shuttle"
    path.mkdir(mode=0o700)
    return path


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_a_failed_start_leaves_what_is_at_the_path(tmp_path: Path) -> None:
    path = private_dir(tmp_path) / "control.sock"
    path.write_text("a file of the user's\n")

    async def scenario() -> None:
        server = ControlServer(str(path), answer_stop)
        with pytest.raises(ControlSetupError, match="exists and is not a socket"):
            await server.start()
        server.close()

    run(scenario())
    assert path.read_text() == "a file of the user's\n"


def test_a_second_server_is_refused_and_the_first_keeps_its_sockets(tmp_path: Path) -> None:
    path = private_dir(tmp_path) / "control.sock"

    async def scenario() -> None:
        first = ControlServer(str(path), answer_stop)
        await first.start()
        try:
            second = ControlServer(str(path), answer_stop)
            with pytest.raises(ControlInUse, match="another shuttle-client listens on"):
                await second.start()
            second.close()
            assert path.is_socket() and Path(f"{path}.events").is_socket()
        finally:
            first.close()
        assert not path.exists() and not Path(f"{path}.events").exists()

    run(scenario())


def test_a_socket_of_a_client_starting_beside_us_is_not_taken_for_a_dead_ones(
    tmp_path: Path,
) -> None:
    """The other client holds the lock and has bound its socket, not yet listened on it (a
    refused connect, as a dead client's socket gives): the file stays, this one is refused."""
    path = private_dir(tmp_path) / "control.sock"
    holder = os.open(lock_path(str(path)), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(path))
    inode = os.stat(path).st_ino

    async def scenario() -> None:
        second = ControlServer(str(path), answer_stop)
        with pytest.raises(ControlInUse, match="another shuttle-client listens on"):
            await second.start()
        second.close()

    try:
        run(scenario())
        assert path.is_socket()
        assert os.stat(path).st_ino == inode
        assert Path(lock_path(str(path))).exists()
    finally:
        bound.close()
        os.close(holder)


def test_the_files_of_a_killed_client_are_taken_over_and_removed_at_close(tmp_path: Path) -> None:
    """A client killed with SIGKILL leaves its sockets and its lock file, locked by nobody."""
    path = private_dir(tmp_path) / "control.sock"
    for name in (str(path), f"{path}.events"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(name)
    Path(lock_path(str(path))).write_text("")

    async def scenario() -> None:
        server = ControlServer(str(path), answer_stop)
        await server.start()
        try:
            context = zmq.asyncio.Context()
            dealer = context.socket(zmq.DEALER)
            dealer.linger = 0
            try:
                dealer.connect(f"ipc://{path}")
                await dealer.send(encode_frame(1, StopRequest()))
                number, answer = decode_frame(await asyncio.wait_for(dealer.recv(), WAIT))
                assert (number, type(answer)) == (1, StopAnswer)
            finally:
                dealer.close()
                context.term()
        finally:
            server.close()

    run(scenario())
    assert os.listdir(path.parent) == []


def test_at_most_max_busy_requests_are_handled_at_once(tmp_path: Path) -> None:
    path = private_dir(tmp_path) / "control.sock"
    release = asyncio.Event()

    async def slow(request: Message) -> Message:
        await release.wait()
        return StopAnswer()

    async def scenario() -> None:
        server = ControlServer(str(path), slow)
        await server.start()
        context = zmq.asyncio.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.linger = 0
        try:
            dealer.connect(f"ipc://{path}")
            for number in range(1, MAX_BUSY + 6):  # all at once, before any is answered
                await dealer.send(encode_frame(number, StopRequest()))
            busy = [decode_frame(await asyncio.wait_for(dealer.recv(), WAIT)) for _ in range(5)]
            assert sorted(number for number, _ in busy) == list(range(MAX_BUSY + 1, MAX_BUSY + 6))
            assert all(isinstance(answer, ControlError) for _, answer in busy)
            assert all("busy" in answer.text for _, answer in busy)  # type: ignore[attr-defined]
            release.set()
            served = [
                decode_frame(await asyncio.wait_for(dealer.recv(), WAIT)) for _ in range(MAX_BUSY)
            ]
            assert sorted(number for number, _ in served) == list(range(1, MAX_BUSY + 1))
            assert all(isinstance(answer, StopAnswer) for _, answer in served)
        finally:
            dealer.close()
            context.term()
            server.close()

    run(scenario())
    assert os.listdir(path.parent) == []


class RealTable:
    """The client's real request table, over a Running of a client that is not up yet (no
    tunnel, no firewall session): as a script meets it during start-up. Built in the
    server's loop at the first request (Streams needs a running loop)."""

    def __init__(self) -> None:
        self.held: Dict[type, asyncio.Event] = {}  # ServerThread.close() looks here
        self.stops: List[str] = []
        self._handle: Optional[Callable[[Message], Awaitable[Message]]] = None

    async def handle(self, request: Message) -> Message:
        if self._handle is None:
            options = parse_args(["-r", "server", "10.0.0.0/8"])
            client = Running(
                options, Streams(options), FirewallSession("/nonexistent"), self.stops.append
            )
            self._handle = handler(client)
        return await self._handle(request)


_IDS = st.integers(0, MAX_REQUEST_ID)
_FIELDS = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),  # what msgpack can carry
        st.text(max_size=20),
        st.binary(max_size=20),
    ),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=12,
)
_FRAMES = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda request_id, tag, fields: msgpack.packb([request_id, tag, *fields]),
        _IDS,
        st.one_of(st.integers(128, 191), st.integers(-5, 300)),
        st.lists(_FIELDS, max_size=4),
    ),
    st.builds(
        lambda request_id, cls: encode_frame(request_id, cls()),
        _IDS,
        st.sampled_from([cls for cls in REQUESTS if not cls.FIELDS]),
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(_FRAMES, min_size=1, max_size=8))
def test_any_frame_gets_its_answer_and_the_server_goes_on(frames: List[bytes]) -> None:
    """Whatever the caller sends, each frame gets one answer (under its id, where it has
    one): the request's answer or a ControlError, never silence or a crash."""
    with running_server(RealTable()) as server:  # type: ignore[arg-type]
        context = zmq.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.linger = 0
        try:
            dealer.connect(f"ipc://{server.path}")
            for frame in frames:
                dealer.send(frame)
                assert dealer.poll(int(WAIT * 1000)), f"no answer to {frame[:60]!r}"
                answer_id, answer = decode_frame(dealer.recv())
                try:
                    request_id, request = decode_frame(frame)
                except RemoteProtocolError:
                    assert isinstance(answer, ControlError) and answer.text.startswith(
                        "bad request"
                    )
                    assert answer_id == request_id_of(frame)  # under its id, if it has one
                    continue
                assert answer_id == request_id
                assert isinstance(
                    answer, (ControlError, cm.PAIRS.answers.get(type(request), ControlError))
                )
            dealer.send(encode_frame(1, StatusRequest()))
            assert dealer.poll(int(WAIT * 1000))
            assert isinstance(decode_frame(dealer.recv())[1], StatusAnswer)
        finally:
            dealer.close()
            context.term()

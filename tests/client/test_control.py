"""The control server's own rules, on real ipc sockets: it removes only the socket files it
made, never takes a live client's path, and handles at most MAX_BUSY requests at once."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from shuttle_client.control import MAX_BUSY, ControlInUse, ControlServer, ControlSetupError
from shuttle_protocol.control_messages import ControlError, StatusRequest, StopAnswer
from shuttle_protocol.frames import decode_frame, encode_frame
from shuttle_protocol.schema import Message

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
                await dealer.send(encode_frame(number, StatusRequest()))
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

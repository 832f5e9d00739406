"""Reconnect and the kill switch, with real agents behind a stand-in for ssh that can be made
to fail: a lost stream comes back, connections that arrive meanwhile wait and then go
through (or are reset after the wait), and nothing reaches the destination in between."""

import asyncio
import os
import signal
import socket
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, List, Tuple

import pytest
from shuttle_client.cli import parse_args
from shuttle_client.proxy import serve
from shuttle_client.streams import Streams
from shuttle_protocol.control_messages import (
    ChannelClosed,
    ChannelOpened,
    Connected,
    Disconnected,
    Reconnecting,
)
from shuttle_protocol.schema import Message

from .agents import run

# Like conftest's stand-in, but it fails as ssh does when it cannot connect while the file
# named by $SHUTTLE_TEST_BLOCK exists.
FLAKY_SSH = """#!/bin/sh
if [ -e "$SHUTTLE_TEST_BLOCK" ]; then echo "ssh: connect: refused" >&2; exit 255; fi
while [ "$1" != "--" ]; do shift; done
shift 2
exec sh -c "$1"
"""


@pytest.fixture
def flaky_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tuple[str, Path]:
    """(the stand-in's path, the file that makes it fail while it exists)."""
    path = tmp_path / "flaky-ssh"
    path.write_text(FLAKY_SSH)
    path.chmod(0o755)
    block = tmp_path / "block"
    monkeypatch.setenv("SHUTTLE_TEST_BLOCK", str(block))
    return str(path), block


def streams_for(ssh: str, *extra: str, events: List[Message]) -> Streams:
    options = parse_args(
        ["-r", "server", "-e", ssh, "--python", "/usr/bin/python3", *extra, "10.0.0.0/8"]
    )
    return Streams(options, events.append)


class Echo:
    """An echo server that counts the connections it got."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: Any = None

    async def start(self) -> int:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(echo, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])


async def listen(streams: Streams, port: int, wait: float) -> Tuple[Any, Tuple[str, int]]:
    """A listener whose connections all go to 127.0.0.1:port, as if redirected there."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    servers = await serve(streams, [listener], lambda sock: ("127.0.0.1", port), wait)
    return servers[0], listener.getsockname()


async def connect(address: Tuple[str, int]) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*address)


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    for _ in range(int(timeout * 20)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout} s")


@asynccontextmanager
async def tunnelled(
    ssh: str, events: List[Message], wait: float
) -> AsyncIterator[Tuple[Echo, Streams, Tuple[str, int]]]:
    """An echo server, Streams through ssh, and a listener whose connections go to the echo
    through them, holding a connection up to wait seconds for a stream; all closed after."""
    echo = Echo()
    port = await echo.start()
    streams = streams_for(ssh, events=events)
    await streams.start()
    server, address = await listen(streams, port, wait=wait)
    try:
        yield echo, streams, address
    finally:
        server.close()
        await streams.stop()
        echo.server.close()


def agent_pid(streams: Streams, index: int = 0) -> int:
    process = streams.tunnels[index]._process
    assert process is not None
    return process.pid


def test_a_lost_stream_comes_back_and_held_connections_go_through(
    flaky_ssh: Tuple[str, Path],
) -> None:
    ssh, block = flaky_ssh
    events: List[Message] = []

    async def scenario() -> None:
        async with tunnelled(ssh, events, wait=30) as (echo, streams, address):
            reader, writer = await connect(address)
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"
            block.touch()
            os.kill(agent_pid(streams), signal.SIGKILL)
            # The connection in flight is reset, not ended as if it were complete.
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 10)
            writer.close()
            await until(lambda: any(isinstance(e, Reconnecting) for e in events))
            assert streams.up == 0 and streams.pick() is None
            # A connection during the outage waits; nothing reaches the destination.
            reader, writer = await connect(address)
            writer.write(b"during")
            await until(lambda: sum(isinstance(e, Reconnecting) for e in events) >= 2)
            assert echo.connections == 1
            block.unlink()
            assert await asyncio.wait_for(reader.readexactly(6), 40) == b"during"
            assert echo.connections == 2
            assert streams.reconnects == 1 and streams.up == 1
            writer.close()

    run(scenario())
    kinds = [type(event) for event in events]
    assert kinds[:4] == [Connected, ChannelOpened, ChannelClosed, Disconnected]
    assert kinds[4:-3] == [Reconnecting] * (len(kinds) - 7)
    assert kinds[-3:] == [Connected, ChannelOpened, ChannelClosed]
    closed = [event for event in events if isinstance(event, ChannelClosed)]
    assert [(event.bytes_up, event.bytes_down) for event in closed] == [(6, 6), (6, 6)]


def test_a_held_connection_is_reset_when_the_wait_runs_out(flaky_ssh: Tuple[str, Path]) -> None:
    ssh, block = flaky_ssh
    events: List[Message] = []

    async def scenario() -> None:
        async with tunnelled(ssh, events, wait=0.5) as (echo, streams, address):
            block.touch()
            os.kill(agent_pid(streams), signal.SIGKILL)
            await until(lambda: streams.up == 0)
            reader, writer = await connect(address)
            writer.write(b"never")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(10), 10)
            assert echo.connections == 0
            writer.close()

    run(scenario())


def test_an_agent_that_stops_answering_pings_is_replaced(fake_ssh: str) -> None:
    events: List[Message] = []

    async def scenario() -> None:
        streams = streams_for(fake_ssh, "--keepalive=0.2", events=events)
        await streams.start()
        first = streams.tunnels[0]
        stopped = agent_pid(streams)
        try:
            os.kill(stopped, signal.SIGSTOP)
            await until(lambda: streams.reconnects == 1 and streams.up == 1)
            assert streams.tunnels[0] is not first
            assert first.link.closed.result().startswith("the agent did not answer a ping")
        finally:
            await streams.stop()

    run(scenario())
    reasons = [e.reason for e in events if isinstance(e, Disconnected)]
    assert reasons == ["the agent did not answer a ping in 0.6 s"]


def test_without_reconnect_a_lost_stream_ends_the_client(fake_ssh: str) -> None:
    events: List[Message] = []

    async def scenario() -> None:
        streams = streams_for(fake_ssh, "--no-reconnect", events=events)
        await streams.start()
        try:
            os.kill(agent_pid(streams), signal.SIGKILL)
            reason = await asyncio.wait_for(streams.lost, 20)
            assert "agent" in reason
        finally:
            await streams.stop()

    run(scenario())
    assert not any(isinstance(event, Reconnecting) for event in events)


# An agent that greets and is gone at once: each reconnect "works", and the stream is lost
# again straight away.
FLEETING_AGENT = """
import sys
from shuttle_protocol import PROTOCOL_VERSION
from shuttle_protocol.stream import encode
from shuttle_protocol.stream_messages import Hello
sys.stdout.buffer.write(encode(Hello(PROTOCOL_VERSION, ("tcp",), "fleeting")))
sys.stdout.buffer.flush()
"""


def test_a_stream_that_keeps_breaking_backs_off_further(tmp_path: Path) -> None:
    agent = tmp_path / "agent.py"
    agent.write_text(FLEETING_AGENT)
    ssh = tmp_path / "ssh"
    ssh.write_text(f"#!/bin/sh\nexec {sys.executable} {agent}\n")
    ssh.chmod(0o755)
    events: List[Message] = []

    async def scenario() -> None:
        streams = streams_for(str(ssh), events=events)
        await streams.start()
        try:
            await until(lambda: sum(isinstance(e, Reconnecting) for e in events) >= 3)
        finally:
            await streams.stop()

    run(scenario())
    delays = [e.delay for e in events if isinstance(e, Reconnecting)]
    assert delays[:3] == [1.0, 2.0, 4.0]

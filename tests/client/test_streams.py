"""--streams: several tunnels (real agents behind a stand-in for ssh), one picked per channel."""

import asyncio
import os
import socket
from typing import Callable

import pytest
from shuttle_client.cli import parse_args
from shuttle_client.streams import Streams
from shuttle_client.tunnel import TunnelError
from shuttle_protocol.control_messages import Connection

from .agents import echo_server, exchange, open_on_link, run


def options(fake_ssh: str, streams: int, python: str = "/usr/bin/python3") -> object:
    return parse_args(
        ["-r", "server", "-e", fake_ssh, "--python", python, f"--streams={streams}", "10.0.0.0/8"]
    )


async def open_on(streams: Streams, port: int) -> socket.socket:
    """A channel to 127.0.0.1:port on the tunnel that pick() chooses; the program's end."""
    return await open_on_link(streams.pick(), port)


def test_channels_spread_evenly_over_every_stream(fake_ssh: str) -> None:
    async def scenario() -> None:
        server = await echo_server()
        streams = Streams(options(fake_ssh, 3))  # type: ignore[arg-type]
        await streams.start()
        try:
            assert [link.peer for link in streams.links] == ["agent 1/3", "agent 2/3", "agent 3/3"]
            assert streams.agent_capabilities == ("tcp", "udp", "probe")
            port = server.sockets[0].getsockname()[1]
            programs = [await open_on(streams, port) for _ in range(30)]
            assert [len(link.mux.channels) for link in streams.links] == [10, 10, 10]
            payloads = [os.urandom(5000 + i) for i in range(30)]
            assert await asyncio.gather(*map(exchange, programs, payloads)) == payloads
        finally:
            await streams.stop()
            server.close()

    run(scenario())


def test_a_new_channel_goes_to_the_least_busy_stream(fake_ssh: str) -> None:
    async def scenario() -> None:
        server = await echo_server()
        streams = Streams(options(fake_ssh, 2))  # type: ignore[arg-type]
        await streams.start()
        try:
            port = server.sockets[0].getsockname()[1]
            busy = [await open_on(streams, port) for _ in range(4)]  # taking turns
            first, second = streams.links
            assert len(first.mux.channels) == len(second.mux.channels) == 2
            for program in busy[::2]:  # the first stream's two channels end
                assert await exchange(program, b"x") == b"x"
            await wait_for(lambda: not first.mux.channels)
            for _ in range(3):
                assert streams.pick() is first
            for program in busy[1::2]:
                program.close()
        finally:
            await streams.stop()
            server.close()

    run(scenario())


async def wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within 2 s")


def test_one_stream_that_cannot_start_stops_them_all(fake_ssh: str) -> None:
    async def scenario() -> None:
        streams = Streams(options(fake_ssh, 3, python="/nonexistent/python3"))  # type: ignore[arg-type]
        with pytest.raises(TunnelError, match="not found on the server"):
            await streams.start()
        assert all(link.closed.done() for link in streams.links)

    run(scenario())


class Tally:
    """A flow of a kind Streams has never heard of: it is listed as it describes itself."""

    def __init__(self, channel: int, age: float) -> None:
        self.channel, self.age = channel, age

    def describe(self, now: float, stream: int) -> Connection:
        return (self.channel, stream, "udp", "127.0.0.1:5000", "10.1.2.3", 53, 1, 2, self.age)


def test_every_flow_describes_itself_under_its_stream(fake_ssh: str) -> None:
    async def scenario() -> None:
        server = await echo_server()
        streams = Streams(options(fake_ssh, 2))  # type: ignore[arg-type]
        await streams.start()
        try:
            first, second = streams.links
            first.flows[101] = Tally(101, 1.0)  # type: ignore[assignment]
            second.flows[102] = Tally(102, 5.0)  # type: ignore[assignment]
            # A plain relay is no captured connection: not listed.
            program = await open_on_link(first, server.sockets[0].getsockname()[1])
            assert [item[:2] for item in streams.connections()] == [(102, 1), (101, 0)]
            program.close()
        finally:
            first.flows.pop(101)  # before the Link resets its flows: a Tally has nothing to free
            second.flows.pop(102)
            await streams.stop()
            server.close()

    run(scenario())

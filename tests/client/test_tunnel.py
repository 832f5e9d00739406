"""The tunnel against a real agent process, with a stand-in for ssh that runs it locally.

These are the client's transcript tests without a network: the real upload, handshake,
channels, credit windows and refusals, over real pipes; only sshd is replaced.
"""

import asyncio
import glob
import hashlib
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Coroutine, Optional

import pytest
from shuttle_agent.relay import Link, Relay
from shuttle_client.cli import parse_args
from shuttle_client.tunnel import Tunnel, TunnelError
from shuttle_protocol import PROTOCOL_VERSION


def oldest_python(pattern: str) -> Optional[str]:
    found = sorted(glob.glob(f"/root/.pyenv/versions/{pattern}/bin/python3"))
    return found[0] if found else None


async def start(fake_ssh: str, python: str = "/usr/bin/python3") -> Tunnel:
    options = parse_args(["-r", "server", "-e", fake_ssh, "--python", python, "10.0.0.0/8"])
    tunnel = Tunnel(options)
    await tunnel.start()
    return tunnel


async def echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def open_channel(tunnel: Tunnel, port: int) -> socket.socket:
    """A channel to 127.0.0.1:port; returns the program's end of a socket pair."""
    return await open_on_link(tunnel.link, port)


async def open_on_link(link: Link, port: int) -> socket.socket:
    """A channel on link to 127.0.0.1:port; returns the program's end of a socket pair."""
    ours, program = socket.socketpair()
    relay = Relay(link, link.mux.open("127.0.0.1", port))
    await asyncio.get_running_loop().create_connection(lambda: relay, sock=ours)
    link.schedule_flush()
    program.setblocking(False)
    return program


async def exchange(program: socket.socket, data: bytes) -> bytes:
    loop = asyncio.get_running_loop()

    async def send() -> None:
        await loop.sock_sendall(program, data)
        program.shutdown(socket.SHUT_WR)

    sender = asyncio.ensure_future(send())
    received = bytearray()
    try:
        while chunk := await asyncio.wait_for(loop.sock_recv(program, 1 << 20), 30):
            received += chunk
        await sender
    finally:
        program.close()
    return bytes(received)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


def test_bulk_echo_is_byte_exact_beyond_many_windows(fake_ssh: str) -> None:
    async def scenario() -> None:
        server = await echo_server()
        tunnel = await start(fake_ssh)
        try:
            program = await open_channel(tunnel, server.sockets[0].getsockname()[1])
            data = os.urandom(12 * 1024 * 1024)  # twelve windows' worth
            received = await exchange(program, data)
            assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        finally:
            await tunnel.stop()
            server.close()

    run(scenario())


def test_many_channels_at_once(fake_ssh: str) -> None:
    async def scenario() -> None:
        server = await echo_server()
        tunnel = await start(fake_ssh)
        try:
            port = server.sockets[0].getsockname()[1]
            programs = [await open_channel(tunnel, port) for _ in range(100)]
            payloads = [os.urandom(1000 + i) for i in range(100)]
            results = await asyncio.gather(*map(exchange, programs, payloads))
            assert results == payloads
        finally:
            await tunnel.stop()
            server.close()

    run(scenario())


def test_refused_connect_resets_the_local_socket(fake_ssh: str) -> None:
    async def scenario() -> None:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connects are refused
        tunnel = await start(fake_ssh)
        try:
            program = await open_channel(tunnel, port)
            loop = asyncio.get_running_loop()
            # A socket pair cannot carry a RST; the reset shows as an immediate close.
            with program:
                assert await asyncio.wait_for(loop.sock_recv(program, 10), 30) == b""
            assert tunnel.link.channels == {}
        finally:
            await tunnel.stop()
            closed.close()

    run(scenario())


def test_stop_ends_the_agent_cleanly(fake_ssh: str) -> None:
    async def scenario() -> None:
        tunnel = await start(fake_ssh)
        assert tunnel.agent_python
        await tunnel.stop()
        assert await tunnel.wait_exit(5) == 0

    run(scenario())


def test_missing_python_is_one_clear_error(fake_ssh: str) -> None:
    async def scenario() -> None:
        with pytest.raises(TunnelError, match="no-such-python was not found on the server"):
            await start(fake_ssh, "no-such-python")

    run(scenario())


def test_agent_runs_on_the_oldest_supported_python(fake_ssh: str) -> None:
    python = oldest_python("3.8.*")
    if python is None:
        pytest.skip("no Python 3.8 under /root/.pyenv on this machine")

    async def scenario() -> None:
        server = await echo_server()
        tunnel = await start(fake_ssh, python)
        try:
            assert tunnel.agent_python.startswith("3.8.")
            program = await open_channel(tunnel, server.sockets[0].getsockname()[1])
            assert await exchange(program, b"hello from 3.8") == b"hello from 3.8"
        finally:
            await tunnel.stop()
            server.close()

    run(scenario())


def test_too_old_python_is_one_clear_error(fake_ssh: str, caplog: pytest.LogCaptureFixture) -> None:
    python = oldest_python("3.6.*") or oldest_python("3.7.*")
    if python is None:
        pytest.skip("no Python 3.6 or 3.7 under /root/.pyenv on this machine")

    async def scenario() -> None:
        with pytest.raises(TunnelError, match="the agent did not start"):
            await start(fake_ssh, python)

    caplog.set_level(logging.INFO, logger="shuttle")
    run(scenario())
    # ssh's stderr, where the agent said it, comes to the log, line by line.
    said = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("shuttle-agent: needs python 3.8 or newer, the server has 3.") for m in said
    )


FUTURE_AGENT = """
import sys
from shuttle_protocol.stream import StreamDecoder, encode
from shuttle_protocol.stream_messages import Hello
sys.stdin.buffer.read(int(sys.stdin.buffer.readline()))  # the upload
sys.stdout.buffer.write(encode(Hello(99, ("tcp",), "3.99.0")))
sys.stdout.buffer.flush()
decoder, got = StreamDecoder(), []
while not got and (data := sys.stdin.buffer.read1(4096)):
    got = decoder.feed(data)
print("agent got:", got, file=sys.stderr)
"""


def test_version_mismatch_is_one_clear_error_on_the_client_side(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = tmp_path / "future_agent.py"
    script.write_text(FUTURE_AGENT)
    fake = tmp_path / "fake-ssh"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {script}\n")
    fake.chmod(0o755)

    async def scenario() -> None:
        with pytest.raises(TunnelError) as raised:
            await start(str(fake))
        assert str(raised.value) == (
            f"protocol version mismatch: the agent speaks 99, this client {PROTOCOL_VERSION}"
        )

    caplog.set_level(logging.INFO, logger="shuttle")
    run(scenario())
    assert any(
        "agent got: [Error(text='protocol version mismatch" in r.getMessage()
        for r in caplog.records
    )

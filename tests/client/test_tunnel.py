"""The tunnel against a real agent process, with a stand-in for ssh that runs it locally.

These are the client's transcript tests without a network: the real upload, handshake,
channels, credit windows and refusals, over real pipes; only sshd is replaced.
"""

import asyncio
import hashlib
import logging
import os
import socket
import sys
from pathlib import Path

import pytest
from shuttle_client.tunnel import TunnelError
from shuttle_protocol import PROTOCOL_VERSION

from .agents import echo_server, exchange, oldest_python, open_channel, run, start


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
    if python is None:  # a failure, not a skip: the promise of Python 3.8 is not left untested
        pytest.fail("no Python 3.8 under /root/.pyenv: install it (pyenv install 3.8.18)")

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

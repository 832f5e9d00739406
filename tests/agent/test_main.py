"""The agent as a process, driven over its stdin/stdout the way the client drives it."""

import errno
import socket
import subprocess
from typing import Iterator, List

import pytest
from shuttle_agent.main import EXIT_PROTOCOL
from shuttle_client.upload import STAGE1, build_payload
from shuttle_protocol import PROTOCOL_VERSION
from shuttle_protocol.schema import Message
from shuttle_protocol.stream import StreamDecoder, encode
from shuttle_protocol.stream_messages import (
    Error,
    Hello,
    Open,
    Opened,
    Ping,
    Pong,
    Refused,
    Welcome,
)

SERVER_PYTHON = "/usr/bin/python3"


class AgentProcess:
    """A real agent booted from the upload payload, with a decoder on its stdout."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [SERVER_PYTHON, "-c", STAGE1],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.decoder = StreamDecoder()
        self.pending: List[Message] = []
        self.send_raw(build_payload())

    def send_raw(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def send(self, msg: Message) -> None:
        self.send_raw(encode(msg))

    def receive(self) -> Message:
        """The next message; fails the test if the agent closes its stdout first."""
        assert self.process.stdout is not None
        for _ in range(10_000):
            if self.pending:
                return self.pending.pop(0)
            data = self.process.stdout.read1(65536)
            if not data:
                pytest.fail("the agent closed its stdout: " + self.finish()[1])
            self.pending.extend(self.decoder.feed(data))
        pytest.fail("no message from the agent")

    def finish(self) -> "tuple[int, str]":
        """Close stdin; (exit status, stderr)."""
        assert self.process.stdin is not None and self.process.stderr is not None
        self.process.stdin.close()
        status = self.process.wait(timeout=10)
        return status, self.process.stderr.read().decode()


@pytest.fixture
def agent() -> Iterator[AgentProcess]:
    process = AgentProcess()
    yield process
    process.process.kill()
    process.process.wait()
    for stream in (process.process.stdin, process.process.stdout, process.process.stderr):
        if stream is not None:
            stream.close()


def welcomed(agent: AgentProcess) -> AgentProcess:
    hello = agent.receive()
    assert isinstance(hello, Hello)
    agent.send(Welcome(PROTOCOL_VERSION, ("tcp",)))
    return agent


def test_hello_comes_first_with_version_and_python(agent: AgentProcess) -> None:
    hello = agent.receive()
    assert isinstance(hello, Hello)
    assert hello.version == PROTOCOL_VERSION
    assert "tcp" in hello.capabilities
    assert hello.python.startswith("3.")
    assert agent.finish()[0] == 0


def test_version_mismatch_is_one_clear_error_on_the_agent_side(agent: AgentProcess) -> None:
    agent.receive()
    agent.send(Welcome(PROTOCOL_VERSION + 1, ()))
    error = agent.receive()
    assert isinstance(error, Error)
    assert f"client speaks protocol {PROTOCOL_VERSION + 1}" in error.text
    status, stderr = agent.finish()
    assert stderr.count("protocol") == 1, stderr
    assert status == EXIT_PROTOCOL
    assert "Traceback" not in stderr


def test_open_before_welcome_is_refused(agent: AgentProcess) -> None:
    agent.receive()
    agent.send(Open(1, "127.0.0.1", 9))
    error = agent.receive()
    assert isinstance(error, Error)
    assert "before Welcome" in error.text


def test_garbage_closes_the_session_with_a_clear_message(agent: AgentProcess) -> None:
    welcomed(agent).send_raw(b"\xc1\xc1\xc1")
    error = agent.receive()
    assert isinstance(error, Error)
    assert "client broke the protocol" in error.text
    status, stderr = agent.finish()
    assert status == EXIT_PROTOCOL
    assert "Traceback" not in stderr
    assert "client broke the protocol" in stderr


def test_ping_is_answered(agent: AgentProcess) -> None:
    welcomed(agent).send(Ping(42))
    assert agent.receive() == Pong(42)


def test_refused_connect_reports_the_errno(agent: AgentProcess) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
        port = closed.getsockname()[1]
        welcomed(agent).send(Open(1, "127.0.0.1", port))
        refused = agent.receive()
    assert isinstance(refused, Refused)
    assert refused.channel == 1
    assert refused.errno == errno.ECONNREFUSED


def test_open_connects(agent: AgentProcess) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        welcomed(agent).send(Open(1, "127.0.0.1", listener.getsockname()[1]))
        assert agent.receive() == Opened(1)
        listener.accept()[0].close()

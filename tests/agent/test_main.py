"""The agent as a process, driven over its stdin/stdout the way the client drives it.

The answers to GetRoutes, GetNameservers and GetHosts are driven in test_routes.py,
test_resolv.py and test_hosts.py.
"""

import errno
import os
import socket
from typing import Any, List, Tuple

import pytest
from shuttle_agent.main import EXIT_PROTOCOL
from shuttle_agent.udp import IDLE_ENV, MAX_FLOWS_ENV
from shuttle_protocol import PROTOCOL_VERSION
from shuttle_protocol.stream import encode
from shuttle_protocol.stream_messages import (
    Close,
    Data,
    Datagram,
    Error,
    Hello,
    Open,
    Opened,
    Pace,
    Ping,
    Pong,
    ProbeListen,
    ProbeListening,
    Refused,
    UdpOpen,
    Welcome,
)

from .agent_process import PYTHONS, STUCK, AgentProcess, StartAgent, welcomed


def test_hello_comes_first_with_version_and_python(agent: AgentProcess) -> None:
    hello = agent.receive()
    assert isinstance(hello, Hello)
    assert hello.version == PROTOCOL_VERSION
    assert "tcp" in hello.capabilities
    assert "udp" in hello.capabilities
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


def test_welcome_twice_is_refused(agent: AgentProcess) -> None:
    welcomed(agent).send(Welcome(PROTOCOL_VERSION, ()))
    error = agent.receive()
    assert isinstance(error, Error)
    assert error.text == "Welcome twice"
    status, stderr = agent.finish()
    assert status == EXIT_PROTOCOL
    assert "Traceback" not in stderr


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


def test_pace_is_taken_and_the_session_goes_on(agent: AgentProcess) -> None:
    welcomed(agent)
    agent.send(Pace(4000))
    agent.send(Ping(7))
    assert agent.receive() == Pong(7)
    status, stderr = agent.finish()
    assert status == 0 and "Traceback" not in stderr, stderr


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


@pytest.mark.parametrize("python", PYTHONS)
def test_the_probe_listener_takes_one_connection(start_agent: StartAgent, python: str) -> None:
    agent = welcomed(start_agent(python))
    agent.send(ProbeListen())
    answer = agent.receive()
    assert isinstance(answer, ProbeListening)
    assert answer.port > 0
    with socket.create_connection(("127.0.0.1", answer.port), timeout=STUCK) as probe:
        probe.settimeout(STUCK)
        assert probe.recv(1) == b""  # taken and closed
    status, stderr = agent.finish()
    assert status == 0, stderr


@pytest.mark.parametrize("host", ["", "a" * 64 + ".example"], ids=["empty", "long-label"])
def test_an_unresolvable_host_is_refused_without_a_traceback(
    agent: AgentProcess, host: str
) -> None:
    welcomed(agent).send(Open(1, host, 80))
    refused = agent.receive()
    assert isinstance(refused, Refused) and refused.channel == 1
    agent.send(UdpOpen(2, host, 53))
    refused = agent.receive()
    assert isinstance(refused, Refused) and refused.channel == 2
    agent.send(Ping(1))
    assert agent.receive() == Pong(1)  # the session lives on
    status, stderr = agent.finish()
    assert status == 0
    assert "Traceback" not in stderr and "exception" not in stderr.lower(), stderr


# -- UDP -----------------------------------------------------------------------------------------

LOOPBACKS = ["127.0.0.1", "::1"]


def udp_socket(host: str) -> socket.socket:
    """A UDP socket on a loopback address that fails a stuck test instead of hanging it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(STUCK)
    sock.bind((host, 0))
    return sock


def unused_udp_port(host: str) -> int:
    with udp_socket(host) as sock:
        port: int = sock.getsockname()[1]
    return port  # closed again: datagrams to it draw ICMP port unreachable


def serve_datagrams(server: socket.socket, count: int) -> Tuple[List[bytes], Any]:
    """The next count datagrams that reach server, and where they came from."""
    received: List[bytes] = []
    source = None
    for _ in range(count):
        data, source = server.recvfrom(70000)
        received.append(data)
    return received, source


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("host", LOOPBACKS)
def test_a_datagram_goes_out_and_the_answer_comes_back(
    start_agent: StartAgent, host: str, python: str
) -> None:
    agent = welcomed(start_agent(python))
    with udp_socket(host) as server:
        agent.send(UdpOpen(1, host, server.getsockname()[1]))
        agent.send(Datagram(1, b"question"))
        received, source = serve_datagrams(server, 1)
        assert received == [b"question"]
        server.sendto(b"answer", source)
        assert agent.receive() == Datagram(1, b"answer")
    status, stderr = agent.finish()
    assert status == 0, stderr


@pytest.mark.parametrize("python", PYTHONS)
def test_datagrams_keep_their_order_on_loopback(start_agent: StartAgent, python: str) -> None:
    agent = welcomed(start_agent(python))
    payloads = [b"%d" % i * (i + 1) for i in range(40)]
    with udp_socket("127.0.0.1") as server:
        # One write: the datagrams arrive while the socket is still being set up.
        agent.send_raw(
            encode(UdpOpen(1, "127.0.0.1", server.getsockname()[1]))
            + b"".join(encode(Datagram(1, p)) for p in payloads)
        )
        received, source = serve_datagrams(server, len(payloads))
        assert received == payloads
        for payload in payloads:
            server.sendto(payload[::-1], source)
        assert [agent.receive() for _ in payloads] == [Datagram(1, p[::-1]) for p in payloads]


@pytest.mark.parametrize("python", PYTHONS)
def test_an_empty_datagram_goes_both_ways(start_agent: StartAgent, python: str) -> None:
    agent = welcomed(start_agent(python))
    with udp_socket("::1") as server:
        agent.send(UdpOpen(1, "::1", server.getsockname()[1]))
        agent.send(Datagram(1, b""))
        agent.send(Datagram(1, b"after"))
        received, source = serve_datagrams(server, 2)
        assert received == [b"", b"after"]
        server.sendto(b"", source)
        server.sendto(b"end", source)
        assert agent.receive() == Datagram(1, b"")
        assert agent.receive() == Datagram(1, b"end")


def test_the_largest_datagram_goes_both_ways(agent: AgentProcess) -> None:
    payload = os.urandom(65507)
    with udp_socket("127.0.0.1") as server:
        welcomed(agent).send(UdpOpen(1, "127.0.0.1", server.getsockname()[1]))
        agent.send(Datagram(1, payload))
        received, source = serve_datagrams(server, 1)
        assert received == [payload]
        server.sendto(payload, source)
        assert agent.receive() == Datagram(1, payload)


def test_only_the_destination_is_heard(agent: AgentProcess) -> None:
    with udp_socket("127.0.0.1") as server, udp_socket("127.0.0.1") as stranger:
        welcomed(agent).send(UdpOpen(1, "127.0.0.1", server.getsockname()[1]))
        agent.send(Datagram(1, b"hello"))
        _, source = serve_datagrams(server, 1)
        stranger.sendto(b"spoofed", source)  # the connected socket's kernel filter drops it
        server.sendto(b"genuine", source)
        assert agent.receive() == Datagram(1, b"genuine")


def test_udp_and_tcp_channels_share_the_session(agent: AgentProcess) -> None:
    with socket.socket() as listener, udp_socket("127.0.0.1") as server:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        welcomed(agent).send(Open(1, "127.0.0.1", listener.getsockname()[1]))
        agent.send(UdpOpen(2, "127.0.0.1", server.getsockname()[1]))
        agent.send(Datagram(2, b"udp"))
        assert agent.receive() == Opened(1)
        connection = listener.accept()[0]
        with connection:
            connection.sendall(b"tcp")
            _, source = serve_datagrams(server, 1)
            server.sendto(b"back", source)
            got = {agent.receive(), agent.receive()}
            assert got == {Data(1, b"tcp"), Datagram(2, b"back")}


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("host", LOOPBACKS)
def test_no_listener_closes_the_flow_after_the_icmp_error(
    start_agent: StartAgent, host: str, python: str
) -> None:
    agent = welcomed(start_agent(python))
    agent.send(UdpOpen(1, host, unused_udp_port(host)))
    agent.send(Datagram(1, b"anyone?"))
    closed = agent.receive()
    assert closed == Close(1, os.strerror(errno.ECONNREFUSED))
    agent.send(Datagram(1, b"late"))  # crossed the Close: dropped, no error
    agent.send(Ping(2))
    assert agent.receive() == Pong(2)
    status, stderr = agent.finish()
    assert status == 0
    assert "Traceback" not in stderr, stderr


def test_an_idle_flow_expires_and_releases_its_socket(start_agent: StartAgent) -> None:
    agent = welcomed(start_agent(**{IDLE_ENV: "0.2"}))
    with udp_socket("127.0.0.1") as server:
        agent.send(UdpOpen(1, "127.0.0.1", server.getsockname()[1]))
        agent.send(Datagram(1, b"once"))
        _, source = serve_datagrams(server, 1)
        assert agent.receive() == Close(1, "idle for 0.2 s")
        server.sendto(b"too late", source)  # the socket is gone: nothing is relayed
        agent.send(Ping(3))
        assert agent.receive() == Pong(3)


def test_flows_beyond_the_cap_are_refused(start_agent: StartAgent) -> None:
    agent = welcomed(start_agent(**{MAX_FLOWS_ENV: "2"}))
    with udp_socket("127.0.0.1") as server:
        port = server.getsockname()[1]
        for channel in (1, 2, 3):
            agent.send(UdpOpen(channel, "127.0.0.1", port))
        refused = agent.receive()
        assert isinstance(refused, Refused)
        assert (refused.channel, refused.errno) == (3, errno.EMFILE)
        agent.send(Close(1, "expired"))  # one flow fewer: room for the next
        agent.send(UdpOpen(4, "127.0.0.1", port))
        agent.send(Datagram(4, b"fits"))
        received, source = serve_datagrams(server, 1)
        assert received == [b"fits"]
        server.sendto(b"yes", source)
        assert agent.receive() == Datagram(4, b"yes")


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_setting_is_reported_and_ignored(start_agent: StartAgent, value: str) -> None:
    agent = welcomed(start_agent(**{IDLE_ENV: value, MAX_FLOWS_ENV: value}))
    agent.send(Ping(4))
    assert agent.receive() == Pong(4)
    status, stderr = agent.finish()
    assert status == 0
    assert f"ignoring {IDLE_ENV}" in stderr and f"ignoring {MAX_FLOWS_ENV}" in stderr


def test_stream_data_on_a_udp_channel_ends_the_session(agent: AgentProcess) -> None:
    welcomed(agent).send(UdpOpen(1, "127.0.0.1", 9))
    agent.send(Data(1, b"x"))
    error = agent.receive()
    assert isinstance(error, Error)
    assert "Data on a UDP channel" in error.text
    status, stderr = agent.finish()
    assert status == EXIT_PROTOCOL
    assert "Traceback" not in stderr

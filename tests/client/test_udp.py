"""UDP through tproxy: original destinations from ancillary data, and the flows' lifetime."""

import asyncio
import logging
import socket
import struct
from typing import Callable, List, Tuple

import pytest
from shuttle_client import udp
from shuttle_client.logs import Throttle
from shuttle_client.targets import Scope
from shuttle_client.udp import (
    IP_RECVORIGDSTADDR,
    IPV6_RECVORIGDSTADDR,
    UdpRelay,
    original_destination,
)
from shuttle_ends.relay import Link
from shuttle_protocol.firewall_messages import ALL_PORTS
from shuttle_protocol.mux import CLIENT, Mux

from .agents import RecordingPipe


def sockaddr_in(host: str, port: int) -> bytes:
    return struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_aton(host))


def sockaddr_in6(host: str, port: int) -> bytes:
    return struct.pack(
        "!HHI16sI", socket.AF_INET6, port, 0, socket.inet_pton(socket.AF_INET6, host), 0
    )


def test_ipv4_and_ipv6_destinations() -> None:
    v4 = [(socket.SOL_IP, IP_RECVORIGDSTADDR, sockaddr_in("198.18.2.2", 7009))]
    assert original_destination(v4) == ("198.18.2.2", 7009)
    v6 = [(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, sockaddr_in6("fd00:5e:2::2", 53))]
    assert original_destination(v6) == ("fd00:5e:2::2", 53)


def test_other_or_short_ancillary_data_is_no_destination() -> None:
    assert original_destination([]) is None
    assert original_destination([(socket.SOL_SOCKET, 1, b"x" * 16)]) is None
    assert original_destination([(socket.SOL_IP, IP_RECVORIGDSTADDR, b"\x00" * 4)]) is None


def test_a_real_socket_reports_its_destination() -> None:
    # Without TPROXY the original destination is simply the address the datagram reached.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver, socket.socket(
        socket.AF_INET, socket.SOCK_DGRAM
    ) as sender:
        receiver.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        sender.sendto(b"ping", receiver.getsockname())
        payload, ancillary, _, _ = receiver.recvmsg(100, socket.CMSG_SPACE(28))
        assert payload == b"ping"
        assert original_destination(ancillary) == receiver.getsockname()


class FakeFirewall:
    """Stands in for firewalld's reply sockets: a plain UDP socket will do on loopback."""

    def __init__(self) -> None:
        self.handed: List[socket.socket] = []

    async def reply_socket(
        self, address: str, port: int, program: Tuple[str, int]
    ) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        self.handed.append(sock)
        return sock


def relay_on_loopback(
    captures: Callable[[Tuple[str, int]], bool],
) -> Tuple[Link, RecordingPipe, socket.socket, FakeFirewall, UdpRelay]:
    """A started UdpRelay whose one socket is a plain one on loopback (which a program may
    send to directly, as a tproxy socket), its link's pipe recording."""
    link = Link(Mux(CLIENT), lambda msg: None, "agent")
    pipe = RecordingPipe()
    link.attach_writer(pipe)  # type: ignore[arg-type]
    captured = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    captured.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
    captured.bind(("127.0.0.1", 0))
    firewall = FakeFirewall()
    relay = UdpRelay(lambda: link, firewall, [captured], captures)  # type: ignore[arg-type]
    relay.start()
    return link, pipe, captured, firewall, relay


def test_idle_flows_expire_with_their_reply_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udp, "IDLE_TIMEOUT", 0.2)

    async def scenario() -> None:
        # Sent to the socket directly, which only this test may: the scope lets it through.
        link, pipe, captured, firewall, relay = relay_on_loopback(lambda destination: True)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as program:
            program.sendto(b"query", captured.getsockname())
            for _ in range(100):  # the flow opens and gets its reply socket
                await asyncio.sleep(0.01)
                if firewall.handed and link.flows:
                    break
            assert len(link.flows) == 1
            assert b"query" in pipe.data
            for _ in range(200):  # then, idle, it expires
                await asyncio.sleep(0.01)
                if not link.flows:
                    break
        await asyncio.sleep(0.05)  # the Link writes once per loop iteration
        assert link.flows == {} and relay.flows == {}
        assert firewall.handed[0].fileno() == -1  # the reply socket is closed
        assert b"idle" in pipe.data  # the agent is told (Close)
        relay.close()

    asyncio.run(scenario())


def test_a_datagram_sent_to_the_socket_itself_is_dropped(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(udp, "NOT_CAPTURED", Throttle(60.0))  # none logged before

    # A tproxy UDP socket is on loopback, where any local user can send to it: the original
    # destination is then the socket's own address, which the session does not capture.
    async def scenario() -> None:
        scope = Scope([("0.0.0.0/0", *ALL_PORTS)], [], ())
        link, pipe, captured, firewall, relay = relay_on_loopback(scope.captures)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as program:
            for _ in range(3):
                program.sendto(b"query", captured.getsockname())
            for _ in range(100):  # bounded: until the relay has read them
                await asyncio.sleep(0.01)
                if relay.dropped == 3:
                    break
        assert relay.dropped == 3
        assert link.flows == {} and relay.flows == {} and firewall.handed == []
        assert b"query" not in pipe.data
        relay.close()

    caplog.set_level(logging.WARNING, logger="shuttle")
    asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if "did not capture" in r.getMessage()]
    assert len(lines) == 1, lines  # one line, however many come
    assert lines[0].startswith("dropped 1 datagram(s) the firewall did not capture (the last: ")
    assert "to 127.0.0.1:" in lines[0] and "sent to the UDP socket itself" in lines[0]

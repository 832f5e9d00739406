"""--dns on the client: the rewrite of captured destinations, and the UDP relay for queries
that nat and nft redirect to our own sockets, through a real agent (behind a stand-in ssh)."""

import asyncio
import socket
from typing import Tuple

import pytest
from shuttle_client import dns
from shuttle_client.dns import DnsRelay, Nameserver, make_udp_sockets

from .agents import run, start


def test_only_port_53_of_the_captured_resolvers_is_rewritten() -> None:
    nameserver = Nameserver(("10.0.0.53", "2001:db8::53"), ("10.9.0.1", 5353))
    assert nameserver.rewrite(("10.0.0.53", 53)) == ("10.9.0.1", 5353)
    assert nameserver.rewrite(("2001:db8::53", 53)) == ("10.9.0.1", 5353)
    assert nameserver.rewrite(("10.0.0.53", 54)) == ("10.0.0.53", 54)
    assert nameserver.rewrite(("10.0.0.54", 53)) == ("10.0.0.54", 53)


def test_udp_sockets_bind_where_asked_and_skip_a_missing_family() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        sockets = make_udp_sockets([("127.0.0.1", port), ("192.0.2.1", port)])
        try:
            assert [sock.getsockname() for sock in sockets] == [("127.0.0.1", port)]
            assert sockets[0].type == socket.SOCK_DGRAM
        finally:
            for sock in sockets:
                sock.close()


def test_no_udp_socket_at_all_is_an_error() -> None:
    with pytest.raises(OSError):
        make_udp_sockets([("192.0.2.1", 0)])


class Resolver(asyncio.DatagramProtocol):
    """Stands in for the server's resolver: answers every query with b"answer:" + query."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Tuple[str, int]) -> None:
        self.transport.sendto(b"answer:" + data, addr)


def test_queries_from_two_programs_get_their_own_answers(
    fake_ssh: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dns, "IDLE_TIMEOUT", 0.4)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        resolver, _ = await loop.create_datagram_endpoint(Resolver, local_addr=("127.0.0.1", 0))
        tunnel = await start(fake_ssh)
        relay = DnsRelay(
            lambda: tunnel.link,
            make_udp_sockets([("127.0.0.1", 0)]),
            resolver.get_extra_info("sockname"),
        )
        relay.start()
        where = relay.sockets[0].getsockname()
        programs = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        try:
            for n, program in enumerate(programs):
                program.setblocking(False)
                program.sendto(b"query %d" % n, where)
            for n, program in enumerate(programs):
                answer, source = await asyncio.wait_for(loop.sock_recvfrom(program, 1000), 10)
                assert answer == b"answer:query %d" % n
                assert source == where  # the kernel's NAT would turn this into the resolver's
            assert len(relay.flows) == 2 and len(tunnel.link.flows) == 2
            for _ in range(300):  # idle flows expire (bounded wait)
                if not relay.flows:
                    break
                await asyncio.sleep(0.01)
            assert relay.flows == {} and tunnel.link.flows == {}
            programs[0].sendto(b"again", where)  # a new flow opens after expiry
            answer, _ = await asyncio.wait_for(loop.sock_recvfrom(programs[0], 1000), 10)
            assert answer == b"answer:again"
        finally:
            for program in programs:
                program.close()
            relay.close()
            resolver.close()
            await tunnel.stop()

    run(scenario())

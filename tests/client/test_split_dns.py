"""--dns-domains: the domains as given, which queries are the server's side's (dnspython
reads them; anything malformed stays local), and the local queries' way out and back over
real UDP sockets on loopback (the bypass sockets come from a stand-in for firewalld here;
tests/integration/test_split_dns.py has the real one)."""

from __future__ import annotations

import asyncio
import socket

import dns.flags
import dns.message
import pytest
from hypothesis import given
from hypothesis import strategies as st
from shuttle_client.cli import UsageError, parse_args
from shuttle_client.firewall_session import FirewallError
from shuttle_client.split_dns import MAX_DOMAINS, Domains, LocalUdp, parse_domains


def query(name: str, kind: str = "A") -> bytes:
    return dns.message.make_query(name, kind).to_wire()


def test_domains_are_read_as_dns_names() -> None:
    assert parse_domains("Corp.Example., internal,corp.example") == ("corp.example", "internal")


@pytest.mark.parametrize("text", ["", " , ", ".", "a..b", "x" * 64 + ".example"])
def test_what_is_no_domain_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_domains(text)


def test_at_most_so_many_domains() -> None:
    with pytest.raises(ValueError, match=f"at most {MAX_DOMAINS}"):
        parse_domains(",".join(f"d{n}.example" for n in range(MAX_DOMAINS + 1)))


def test_the_option_needs_dns_and_says_what_is_wrong() -> None:
    base = ["-r", "host", "10.0.0.0/8"]
    assert parse_args([*base, "--dns", "--dns-domains=corp.example"]).dns_domains == (
        "corp.example",
    )
    with pytest.raises(UsageError, match="--dns-domains needs --dns"):
        parse_args([*base, "--dns-domains=corp.example"])
    with pytest.raises(UsageError, match="invalid --dns-domains"):
        parse_args([*base, "--dns", "--dns-domains=."])


def test_names_in_the_domains_are_remote_and_others_not() -> None:
    domains = Domains(("corp.example", "internal"))
    assert domains.remote(query("corp.example"))
    assert domains.remote(query("WWW.Corp.Example.", "AAAA"))
    assert domains.remote(query("db.internal", "SRV"))
    assert not domains.remote(query("example"))
    assert not domains.remote(query("notcorp.example"))
    assert not domains.remote(query("corp.example.org"))


def test_a_query_of_two_questions_or_none_stays_local() -> None:
    domains = Domains(("corp.example",))
    two = dns.message.make_query("a.corp.example", "A")
    two.question.append(dns.message.make_query("b.corp.example", "A").question[0])
    assert not domains.remote(two.to_wire())
    none = dns.message.Message()
    assert not domains.remote(none.to_wire())


@given(st.binary(max_size=600))
def test_any_bytes_are_judged_without_raising(data: bytes) -> None:
    assert Domains(("corp.example",)).remote(data) in (True, False)


def test_a_truncated_query_stays_local() -> None:
    wire = query("a.corp.example")
    domains = Domains(("corp.example",))
    assert all(not domains.remote(wire[:end]) for end in range(len(wire)))


class Bypass:
    """Hands out plain UDP sockets as firewalld's bypass sockets, or refuses."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.asked: list[str] = []

    async def bypass_socket(self, kind: str) -> socket.socket:
        self.asked.append(kind)
        if self.refuse:
            raise FirewallError("no")
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def answer_to(wire: bytes, flag: int = dns.flags.RA) -> bytes:
    reply = dns.message.make_response(dns.message.from_wire(wire))
    reply.flags |= flag
    return reply.to_wire()


async def _exchange() -> tuple[list[bytes], list[bytes], list[str], bool]:
    loop = asyncio.get_running_loop()
    resolver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    resolver.bind(("127.0.0.1", 0))
    resolver.setblocking(False)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    firewall = Bypass()
    local = LocalUdp(firewall)  # type: ignore[arg-type]
    got: list[bytes] = []
    try:
        first, second = query("a.example"), query("b.example")
        local.send(first, resolver.getsockname(), got.append)
        local.send(first, resolver.getsockname(), got.append)  # the same id: dropped
        local.send(second, resolver.getsockname(), got.append)
        received = [await asyncio.wait_for(loop.sock_recvfrom(resolver, 65535), 5)]
        received.append(await asyncio.wait_for(loop.sock_recvfrom(resolver, 65535), 5))
        assert sorted(data for data, _ in received) == sorted([first, second])
        source = received[0][1]
        own = local.own(("127.0.0.1", source[1]))
        # An answer from elsewhere, with the right id, is not taken for the resolver's.
        stranger.sendto(answer_to(first, dns.flags.AA), source)
        for data, _ in received:
            resolver.sendto(answer_to(data), source)
        for _ in range(50):  # bounded: 5 s
            if len(got) == 2:
                break
            await asyncio.sleep(0.1)
        return got, [answer_to(first), answer_to(second)], firewall.asked, own
    finally:
        local.close()
        resolver.close()
        stranger.close()


def test_local_queries_go_out_of_one_bypass_socket_and_their_answers_come_back() -> None:
    got, answers, asked, own = asyncio.run(_exchange())
    assert asked == ["udp4"]
    assert sorted(got) == sorted(answers)
    assert own


async def _refused() -> tuple[list[bytes], list[str]]:
    firewall = Bypass(refuse=True)
    local = LocalUdp(firewall)  # type: ignore[arg-type]
    got: list[bytes] = []
    try:
        local.send(query("a.example"), ("127.0.0.1", 9), got.append)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        local.send(query("b.example"), ("127.0.0.1", 9), got.append)  # within RETRY_AFTER
        return got, firewall.asked
    finally:
        local.close()


def test_a_refused_bypass_socket_drops_the_queries_and_is_not_asked_again_at_once() -> None:
    got, asked = asyncio.run(_refused())
    assert got == [] and asked == ["udp4"]

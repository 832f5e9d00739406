"""The SOCKS5 parser (proxies/socks5.py): transcripts of good and bad negotiations, and
hypothesis throwing arbitrary bytes at it, which must end in a request, NEED_DATA or a
RemoteProtocolError, never anything else."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shuttle_client.proxies import socks5
from shuttle_client.proxies.socks5 import NEED_DATA, Request, Socks5Server
from shuttle_client.proxies.socks_udp import parse_datagram
from shuttle_protocol.errors import RemoteProtocolError


def feed(parser: Socks5Server, *chunks: bytes) -> object:
    event: object = NEED_DATA
    for chunk in chunks:
        parser.receive_data(chunk)
        event = parser.next_event()
    return event


def test_connect_by_name_stays_a_name_for_the_agent() -> None:
    parser = Socks5Server()
    assert feed(parser, b"\x05\x01\x00") is NEED_DATA
    assert parser.data_to_send() == b"\x05\x00"
    request = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
    assert feed(parser, request + b"GET") == Request(socks5.CONNECT, "example.com", 443)
    assert parser.trailing == b"GET"
    assert parser.reply(socks5.SUCCEEDED) == b"\x05\x00\x00\x01\0\0\0\0\0\0"


@pytest.mark.parametrize("address", ["198.18.2.2", "fd00:5e:2::2"])
def test_connect_by_address_byte_by_byte(address: str) -> None:
    parser = Socks5Server()
    wire = b"\x05\x02\x00\x02" + b"\x05\x01\x00" + socks5.encode_address(address, 80)
    events = [feed(parser, wire[i : i + 1]) for i in range(len(wire))]
    assert events[:-1] == [NEED_DATA] * (len(wire) - 1)
    assert events[-1] == Request(socks5.CONNECT, str(ipaddress.ip_address(address)), 80)


def test_username_and_password() -> None:
    parser = Socks5Server((b"alice", b"s3cret"))
    assert feed(parser, b"\x05\x02\x00\x02") is NEED_DATA
    assert parser.data_to_send() == b"\x05\x02"
    assert feed(parser, b"\x01\x05alice\x06s3cret") is NEED_DATA
    assert parser.data_to_send() == b"\x01\x00"
    assert feed(parser, b"\x05\x03\x00\x01\0\0\0\0\0\x01") == Request(
        socks5.UDP_ASSOCIATE, "0.0.0.0", 1
    )


@pytest.mark.parametrize(
    ("credentials", "wire", "answer"),
    [
        ((b"alice", b"s3cret"), b"\x05\x01\x00", b"\x05\xff"),  # no auth offered
        ((b"alice", b"s3cret"), b"\x05\x01\x02\x01\x05alice\x05wrong", b"\x05\x02\x01\x01"),
        (None, b"\x04\x01\x00\x50", b""),  # SOCKS4
        (None, b"\x05\x01\x00\x05\x02\x00\x01\0\0\0\0\0\x50", b"\x05\x00\x05\x07"),  # BIND
        (None, b"\x05\x01\x00\x05\x01\x00\x09", b"\x05\x00\x05\x08"),  # address type 9
        (None, b"\x05\x01\x00\x05\x01\x00\x03\x03a b\x00\x50", b"\x05\x00\x05\x04"),
        (None, b"\x05\x01\x00\x05\x01\x00\x01\x01\x02\x03\x04\x00\x00", b"\x05\x00\x05\x04"),
    ],
    ids=["no-auth-method", "wrong-password", "socks4", "bind", "atyp", "bad-name", "port-0"],
)
def test_bad_negotiations_are_answered_then_refused(
    credentials: object, wire: bytes, answer: bytes
) -> None:
    parser = Socks5Server(credentials)  # type: ignore[arg-type]
    parser.receive_data(wire)
    with pytest.raises(RemoteProtocolError):
        parser.next_event()
    assert parser.data_to_send()[: len(answer)] == answer
    with pytest.raises(RemoteProtocolError):  # and it stays refused
        parser.receive_data(b"\x05")


def test_udp_datagram_header() -> None:
    header = b"\0\0\0" + socks5.encode_address("fd00:5e:2::2", 7009)
    assert parse_datagram(header + b"ping") == ("fd00:5e:2::2", 7009, b"ping")
    with pytest.raises(RemoteProtocolError):
        parse_datagram(b"\0\0\x01" + header[3:] + b"fragment")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=12), st.booleans())
def test_fuzz_any_bytes(chunks: list, with_auth: bool) -> None:
    parser = Socks5Server((b"u", b"p") if with_auth else None)
    try:
        for chunk in chunks:
            parser.receive_data(chunk)
            event = parser.next_event()
            assert isinstance(parser.data_to_send(), bytes)
            if event is not NEED_DATA:
                assert isinstance(event, Request) and 1 <= event.port <= 65535
                assert event.host
                break
    except RemoteProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_udp_datagrams(data: bytes) -> None:
    try:
        host, port, _ = parse_datagram(data)
    except RemoteProtocolError:
        return
    assert host and 1 <= port <= 65535


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.ip_addresses().map(str),
        st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,60}[a-z0-9])?", fullmatch=True),
    ),
    st.integers(1, 65535),
)
def test_fuzz_round_trip_of_requests(host: str, port: int) -> None:
    parser = Socks5Server()
    wire = b"\x05\x01\x00" + b"\x05\x01\x00" + socks5.encode_address(host, port)
    try:
        expected = str(ipaddress.ip_address(host))
    except ValueError:
        expected = host
    assert feed(parser, wire) == Request(socks5.CONNECT, expected, port)

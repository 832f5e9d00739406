"""The zeromq frame codec: [request id, tag, field, ...], one msgpack value per frame."""

import ipaddress
from typing import Any, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shuttle_protocol.errors import LocalProtocolError, RemoteProtocolError
from shuttle_protocol.firewall_messages import (
    MAX_SUBNETS,
    CloseSessionAnswer,
    ErrorAnswer,
    OpenSessionRequest,
)
from shuttle_protocol.frames import MAX_FRAME, MAX_REQUEST_ID, decode_frame, encode_frame
from shuttle_protocol.schema import Message
from shuttle_protocol.stream_messages import Data, Ping

from .strategies import IMPLEMENTATIONS, frame_messages, pack, show, with_impl

impls = pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
request_ids = st.integers(0, MAX_REQUEST_ID)


@impls
@given(request_id=request_ids, msg=frame_messages)
@settings(max_examples=200, deadline=None)
def test_every_message_round_trips(impl: str, request_id: int, msg: Message) -> None:
    request_id_back, back = with_impl(impl, decode_frame, encode_frame(request_id, msg))
    assert request_id_back == request_id
    assert type(back) is type(msg)
    assert back == msg


@pytest.mark.parametrize("request_id", [-1, MAX_REQUEST_ID + 1, True, 1.0, "1", None], ids=show)
def test_a_bad_request_id_is_a_local_error(request_id: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(request_id, Ping(1))


@pytest.mark.parametrize("msg", [None, (10, 1), Ping, "Ping"], ids=show)
def test_encoding_what_is_not_a_message_is_a_local_error(msg: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(1, msg)


@impls
@pytest.mark.parametrize(
    "request_id", [-1, MAX_REQUEST_ID + 1, 2**64 - 1, True, 1.0, "1", None, b"1", (1,)], ids=show
)
def test_a_bad_request_id_is_a_remote_error(impl: str, request_id: Any) -> None:
    with pytest.raises(RemoteProtocolError, match="request id"):
        with_impl(impl, decode_frame, pack((request_id, CloseSessionAnswer.TAG)))


GOOD = encode_frame(3, ErrorAnswer("x"))

MALFORMED = {
    "empty": b"",
    "two values": GOOD + GOOD,
    "trailing byte": GOOD + b"\x00",
    "not an array": pack(3),
    "only an id": pack((3,)),
    "empty array": pack(()),
    "map": pack({3: 10}),
    "ext": b"\x93\x03\x0c\xd4\x01\x00",
    "reserved byte": b"\xc1",
    "unknown tag": pack((3, 0, 1)),
    "stream tag": pack((3, Ping.TAG, 1)),
    "wrong arity": pack((3, ErrorAnswer.TAG)),
    "bad field": pack((3, ErrorAnswer.TAG, -1)),
    "invalid utf-8": b"\x93\x03\x0c\xa2\xff\xfe",
    "deep nesting": b"\x91" * 10_000,
    "array over MAX_ITEMS": b"\x93\x03\x01\xdd" + (100_001).to_bytes(4, "big") + b"\xc0" * 100_001,
    "declared bin over the frame": b"\x93\x03\x06\xc6" + (MAX_FRAME + 1).to_bytes(4, "big"),
}


@impls
@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_are_remote_errors(impl: str, data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        with_impl(impl, decode_frame, data)


@impls
@given(msg=frame_messages)
@settings(max_examples=30, deadline=None)
def test_every_truncated_frame_is_a_remote_error(impl: str, msg: Message) -> None:
    data = encode_frame(1, msg)
    for cut in range(0, len(data), max(1, len(data) // 50)):
        with pytest.raises(RemoteProtocolError):
            with_impl(impl, decode_frame, data[:cut])


@impls
@given(data=st.binary(max_size=2000))
@settings(max_examples=300, deadline=None)
def test_garbage_is_decoded_or_refused_never_crashes(impl: str, data: bytes) -> None:
    try:
        request_id, msg = with_impl(impl, decode_frame, data)
    except RemoteProtocolError:
        return
    assert decode_frame(encode_frame(request_id, msg)) == (request_id, msg)


def test_a_frame_over_the_limit_is_refused_before_parsing() -> None:
    payload = b"\x00" * (MAX_FRAME + 1)
    with pytest.raises(RemoteProtocolError, match="over"):
        decode_frame(payload)


def _long_ipv6_networks(count: int) -> List[str]:
    # Eight groups of four digits: 43 characters, the longest a network is written.
    return [
        f"ffff:ffff:ffff:ffff:ffff:ffff:{0x8000 + n // 0x4000:x}:{0x8000 + 2 * (n % 0x4000):x}/127"
        for n in range(count)
    ]


def test_a_message_too_big_for_a_frame_is_a_local_error() -> None:
    subnets = tuple(_long_ipv6_networks(MAX_SUBNETS))
    assert {len(s) for s in subnets} == {43}
    request = OpenSessionRequest("nat", 1, subnets, subnets)
    with pytest.raises(LocalProtocolError, match="over"):
        encode_frame(1, request)


def test_the_largest_ipv4_session_fits_in_a_frame() -> None:
    subnets = tuple(str(ipaddress.IPv4Network((n << 8, 24))) for n in range(MAX_SUBNETS))
    request = OpenSessionRequest("nat", 1, subnets, ())
    data = encode_frame(MAX_REQUEST_ID, request)
    assert len(data) <= MAX_FRAME
    assert decode_frame(data) == (MAX_REQUEST_ID, request)


def test_stream_messages_do_not_travel_in_frames() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown message tag"):
        decode_frame(encode_frame(0, Data(1, b"\x00" * 1000)))

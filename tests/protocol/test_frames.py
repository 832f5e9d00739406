"""The zeromq frame codec: [request id, tag, field, ...], one msgpack value per frame."""

from typing import Any, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shuttle_protocol.errors import LocalProtocolError, RemoteProtocolError
from shuttle_protocol.firewall_messages import (
    ANY_OWNER,
    MAX_ID,
    MAX_SUBNETS,
    CloseSessionAnswer,
    ErrorAnswer,
    OpenSessionRequest,
    Target,
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


def _long_ipv6_targets(count: int) -> List[Target]:
    # Eight groups of four digits: 43 characters, the longest a network is written; ports
    # over 255 take three bytes each, the most a port takes.
    prefix = "ffff:ffff:ffff:ffff:ffff:ffff"
    return [
        (f"{prefix}:{0x8000 + n // 0x4000:x}:{0x8000 + 2 * (n % 0x4000):x}/127", 65535, 65535)
        for n in range(count)
    ]


def _long_ipv4_targets(count: int) -> List[Target]:
    # 18 characters, the longest an IPv4 network is written.
    return [
        (f"255.{100 + n // 2500}.{100 + (n // 50) % 50}.{100 + n % 50}/32", 65534, 65535)
        for n in range(count)
    ]


def _largest_request(subnets: List[Target], excludes: List[Target]) -> OpenSessionRequest:
    # Every other field at its widest encoding too.
    dns = tuple(f"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff{n:02x}" for n in range(16))
    return OpenSessionRequest(
        "auto", 65535, tuple(subnets), tuple(excludes), MAX_ID, MAX_ID, True, dns
    )


def test_the_long_targets_are_distinct_and_as_long_as_they_get() -> None:
    ipv6 = _long_ipv6_targets(MAX_SUBNETS)
    ipv4 = _long_ipv4_targets(MAX_SUBNETS)
    assert {len(t[0]) for t in ipv6} == {43}
    assert {len(t[0]) for t in ipv4} == {18}
    assert len(set(ipv6)) == len(set(ipv4)) == MAX_SUBNETS
    assert len(pack(ipv6[0])) == 1 + 2 + 43 + 3 + 3


def test_a_message_too_big_for_a_frame_is_a_local_error() -> None:
    targets = _long_ipv6_targets(MAX_SUBNETS)
    request = _largest_request(targets, targets)
    with pytest.raises(LocalProtocolError, match="over"):
        encode_frame(1, request)


def test_the_largest_ipv4_session_fits_in_a_frame() -> None:
    targets = _long_ipv4_targets(MAX_SUBNETS)
    request = _largest_request(targets, targets)
    data = encode_frame(MAX_REQUEST_ID, request)
    assert len(data) <= MAX_FRAME
    assert decode_frame(data) == (MAX_REQUEST_ID, request)


def test_the_largest_ipv6_subnets_with_the_largest_ipv4_excludes_fit_in_a_frame() -> None:
    # Bigger than the IPv4 session above, so only its size is checked (decoding is the same).
    request = _largest_request(_long_ipv6_targets(MAX_SUBNETS), _long_ipv4_targets(MAX_SUBNETS))
    data = encode_frame(MAX_REQUEST_ID, request)
    assert MAX_FRAME - 400_000 < len(data) <= MAX_FRAME  # close to the limit, as meant


def test_a_received_frame_over_the_limit_is_refused_even_if_valid() -> None:
    targets = _long_ipv6_targets(MAX_SUBNETS)
    fields = ("nat", 1, tuple(targets), tuple(targets), ANY_OWNER, ANY_OWNER, False)
    data = pack((1, OpenSessionRequest.TAG, *fields))
    assert len(data) > MAX_FRAME
    with pytest.raises(RemoteProtocolError, match="over"):
        decode_frame(data)


def test_stream_messages_do_not_travel_in_frames() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown message tag"):
        decode_frame(encode_frame(0, Data(1, b"\x00" * 1000)))

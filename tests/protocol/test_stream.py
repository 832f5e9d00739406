"""The ssh-pipe codec: round trips, arbitrary splits, and hostile input, on both msgpack
implementations (the agent may run with the pure-Python one)."""

from typing import Any, Iterator, List

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shuttle_protocol.errors import LocalProtocolError, RemoteProtocolError
from shuttle_protocol.schema import Message
from shuttle_protocol.stream import (
    MAX_BUFFER,
    MAX_MESSAGE,
    StreamDecoder,
    encode,
    encode_data_header,
)
from shuttle_protocol.stream_messages import MAX_CHANNEL, MAX_DATA, Data, Hello, Ping

from .strategies import IMPLEMENTATIONS, make_decoder, pack, small_messages, stream_messages

IMPLS = list(IMPLEMENTATIONS)
impls = pytest.mark.parametrize("impl", IMPLS)


def feed_all(decoder: StreamDecoder, chunks: Any) -> List[Message]:
    out: List[Message] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


# -- round trips -----------------------------------------------------------------------------


@impls
@given(msg=stream_messages)
@settings(max_examples=120, deadline=None)
def test_every_message_round_trips(impl: str, msg: Message) -> None:
    data = encode(msg)
    assert len(data) <= MAX_MESSAGE
    (back,) = make_decoder(impl).feed(data)
    assert type(back) is type(msg)
    assert back == msg


@impls
@given(msgs=st.lists(small_messages, max_size=6))
@settings(max_examples=40, deadline=None)
def test_a_sequence_split_at_every_byte_round_trips_in_order(impl: str, msgs: List[Any]) -> None:
    data = b"".join(encode(m) for m in msgs)
    for cut in range(len(data) + 1):
        decoder = make_decoder(impl)
        first = decoder.feed(data[:cut])
        assert first == msgs[: len(first)]
        assert first + decoder.feed(data[cut:]) == msgs
    assert feed_all(make_decoder(impl), chunked(data, 1)) == msgs


@impls
@given(
    msgs=st.lists(stream_messages, max_size=12), cuts=st.lists(st.integers(0, 10_000), max_size=8)
)
@settings(max_examples=60, deadline=None)
def test_any_sequence_in_any_chunks_round_trips(
    impl: str, msgs: List[Any], cuts: List[int]
) -> None:
    data = b"".join(encode(m) for m in msgs)
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    chunks = [data[a:b] for a, b in zip(points, points[1:])]
    assert feed_all(make_decoder(impl), chunks) == msgs


@impls
@pytest.mark.parametrize("chunk", [1000, 65_536, 100_003, 10**8])
def test_many_full_messages_in_big_or_odd_chunks(impl: str, chunk: int) -> None:
    # Messages straddle the decoder's internal slices; none may be refused as too big.
    msgs = [Data(n + 1, bytes([n]) * (MAX_DATA - n)) for n in range(16)]
    data = b"".join(encode(m) for m in msgs)
    assert len(data) > 10 * MAX_BUFFER
    assert feed_all(make_decoder(impl), chunked(data, chunk)) == msgs


@impls
def test_the_largest_message_trickles_in(impl: str) -> None:
    msg = Data(2**63 - 1, b"\x00" * MAX_DATA)
    decoder = make_decoder(impl)
    assert feed_all(decoder, chunked(encode(msg) * 2, 997)) == [msg, msg]


def test_encode_refuses_what_is_not_a_message() -> None:
    for value in [None, (6, 1, b"x"), "Data", Data]:
        with pytest.raises(LocalProtocolError):
            encode(value)  # type: ignore[arg-type]


def test_data_is_a_header_then_the_raw_payload() -> None:
    assert encode(Data(1, b"xy")) == pack((Data.TAG, 1, 2)) + b"xy"
    for header in ((Data.TAG, 1, "x"), (Data.TAG, 1, b"x"), (Data.TAG, 1), (Data.TAG, 0, 1)):
        with pytest.raises(RemoteProtocolError, match="Data"):
            StreamDecoder().feed(pack(header))
    for size in (-1, MAX_DATA + 1, 2**64 - 1, 1.0, True, None):
        with pytest.raises(RemoteProtocolError, match="payload size"):
            StreamDecoder().feed(pack((Data.TAG, 1, size)))


# -- hostile input ----------------------------------------------------------------------------


def assert_failed_for_good(decoder: StreamDecoder) -> None:
    """After an error the decoder refuses everything, even valid input."""
    for data in (b"", encode(Ping(1))):
        with pytest.raises(RemoteProtocolError):
            decoder.feed(data)


MALFORMED = {
    "reserved byte": b"\xc1",
    "map": pack({1: 2}),
    "empty map": pack({}),
    "map in a message": pack((Hello.TAG, 1, {}, "x")),
    "ext": msgpack.packb(msgpack.ExtType(1, b"abc")),
    "timestamp": msgpack.packb(msgpack.Timestamp(1, 0)),
    "invalid utf-8": b"\x93\x0c\xa2\xff\xfe",
    "nil": pack(None),
    "int": pack(7),
    "bin": pack(b"\x06"),
    "empty array": pack(()),
    "unknown tag": pack((0, 1)),
    "float tag": pack((6.0, 1, b"")),
    "bool tag": pack((True,)),
    "too many items": pack((Hello.TAG, 1, ("c",) * 300, "x")),
    "deep nesting": b"\x91" * 5000,
    "wide nesting": b"\xdc\x01\x00" * 2000,
    "too many fields": pack((Ping.TAG, 1, 2)),
    "too few fields": pack((Data.TAG, 1)),
    "float for int": pack((Ping.TAG, 1.0)),
    "negative int": pack((Ping.TAG, -1)),
    "uint64": pack((Ping.TAG, 2**64 - 1)),
    "str for bytes": pack((Data.TAG, 1, "payload")),
    "bin for str": pack((12, b"text")),
    "nil for int": pack((Ping.TAG, None)),
}


@impls
@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_is_a_remote_error_and_final(impl: str, data: bytes) -> None:
    decoder = make_decoder(impl)
    assert decoder.feed(encode(Ping(1))) == [Ping(1)]
    with pytest.raises(RemoteProtocolError):
        decoder.feed(data)
    assert_failed_for_good(decoder)


@impls
@given(prefix=st.lists(small_messages, max_size=3), garbage=st.binary(max_size=3000))
@settings(max_examples=300, deadline=None)
def test_garbage_is_decoded_or_refused_never_crashes(
    impl: str, prefix: List[Any], garbage: bytes
) -> None:
    decoder = make_decoder(impl)
    data = b"".join(encode(m) for m in prefix) + garbage
    try:
        out = feed_all(decoder, chunked(data, 7))
    except RemoteProtocolError:
        assert_failed_for_good(decoder)
    else:
        assert out[: len(prefix)] == prefix


wire_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=20),
        st.binary(max_size=20),
        st.integers(0, 130),  # likely tags
    ),
    lambda inner: st.lists(inner, max_size=5).map(tuple),
    max_leaves=10,
)


@impls
@given(values=st.lists(wire_values, min_size=1, max_size=5))
@settings(max_examples=120, deadline=None)
def test_well_formed_msgpack_of_any_shape_is_a_message_or_refused(
    impl: str, values: List[Any]
) -> None:
    decoder = make_decoder(impl)
    try:
        out = decoder.feed(b"".join(pack(v) for v in values))
    except RemoteProtocolError:
        assert_failed_for_good(decoder)
    else:
        assert len(out) == len(values)
        assert all(isinstance(m, Message) for m in out)


# -- bounded buffering -------------------------------------------------------------------------


def fed_until_refused(decoder: StreamDecoder, chunks: Iterator[bytes], limit: int) -> int:
    """Feed chunks until the decoder refuses; return how many bytes it took (fails at limit)."""
    total = 0
    with pytest.raises(RemoteProtocolError):
        for chunk in chunks:
            decoder.feed(chunk)
            total += len(chunk)
            assert total <= limit, f"decoder still accepting after {total} bytes"
    return total


def zeros(size: int = 4096) -> Iterator[bytes]:
    while True:
        yield b"\x00" * size


@impls
@pytest.mark.parametrize("header", [b"\xc6", b"\xdb"], ids=["bin32", "str32"])
def test_a_declared_length_over_the_limit_is_refused_within_one_buffer(
    impl: str, header: bytes
) -> None:
    decoder = make_decoder(impl)
    opening = b"\x93\x06\x01" + header + (MAX_MESSAGE + 1).to_bytes(4, "big")

    def chunks() -> Iterator[bytes]:
        yield opening
        yield from zeros()

    fed_until_refused(decoder, chunks(), MAX_BUFFER)
    assert_failed_for_good(decoder)


@pytest.mark.parametrize("header", [b"\xc6", b"\xdb"], ids=["bin32", "str32"])
def test_the_pure_python_decoder_refuses_an_oversized_length_at_its_header(header: bytes) -> None:
    decoder = make_decoder("fallback")
    decoder.feed(b"\x93\x06\x01")
    with pytest.raises(RemoteProtocolError):
        decoder.feed(header + (2**32 - 1).to_bytes(4, "big"))


def many_big_items() -> Iterator[bytes]:
    """An array of 256 items, each a bin that alone is within the limits."""
    yield b"\xdc\x01\x00"
    while True:
        yield b"\xc6" + (200_000).to_bytes(4, "big") + b"x" * 200_000


def nested_texts() -> Iterator[bytes]:
    """Arrays of arrays of long texts, never complete."""
    while True:
        yield b"\xdc\x01\x00" + (b"\xda\x10\x00" + b"t" * 4096) * 16


def endless_message() -> Iterator[bytes]:
    """A message that never closes: [Hello, 1, (cap, cap, ...) of 255 items, ...]."""
    yield b"\x93\x01\x01\xdc\x00\xff"
    while True:
        yield b"\xa1c"


@impls
@pytest.mark.parametrize("source", [many_big_items, nested_texts, endless_message])
def test_partial_data_never_grows_the_decoder_beyond_one_buffer(impl: str, source: Any) -> None:
    # Each piece is valid msgpack; only the whole is too big to be any message.
    decoder = make_decoder(impl)
    fed_until_refused(decoder, source(), MAX_BUFFER + 200_005)
    assert_failed_for_good(decoder)


@impls
def test_custom_limits_are_enforced(impl: str) -> None:
    decoder = make_decoder(impl, max_message=1000, max_items=4)
    assert decoder.feed(encode(Data(1, b"x" * 900))) == [Data(1, b"x" * 900)]
    with pytest.raises(RemoteProtocolError):
        feed_all(decoder, chunked(encode(Data(1, b"x" * 2000)), 500))
    decoder = make_decoder(impl, max_message=1000, max_items=4)
    with pytest.raises(RemoteProtocolError):
        decoder.feed(encode(Hello(1, ("a",) * 5, "")))


@impls
@given(data=st.binary(min_size=1, max_size=64))
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_truncated_message_is_only_incomplete(impl: str, data: bytes) -> None:
    encoded = encode(Data(1, data))
    for cut in range(len(encoded)):
        assert make_decoder(impl).feed(encoded[:cut]) == []


EDGES = [1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0xFFFFFFFF, 0x100000000, MAX_CHANNEL]


@given(
    channel=st.one_of(st.sampled_from(EDGES), st.integers(1, MAX_CHANNEL)),
    size=st.one_of(
        st.sampled_from([0, 0xFF, 0x100, 0xFFFF, 0x10000, MAX_DATA]), st.integers(0, MAX_DATA)
    ),
)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_the_data_fast_path_encodes_exactly_as_the_message(channel: int, size: int) -> None:
    payload = bytes(size)
    assert encode_data_header(channel, size) + payload == encode(Data(channel, payload))


BAD_HEADERS = [(0, 1), (MAX_CHANNEL + 1, 1), (1, -1), (1, MAX_DATA + 1), (True, 1), (1, 1.0)]


@pytest.mark.parametrize(("channel", "size"), BAD_HEADERS)
def test_the_data_fast_path_refuses_what_data_refuses(channel: Any, size: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode_data_header(channel, size)

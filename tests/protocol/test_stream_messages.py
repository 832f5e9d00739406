"""Stream messages at the edges of their ranges (the bad-value table is in test_messages)."""

from typing import Any, Callable

import pytest
from shuttle_protocol.errors import LocalProtocolError
from shuttle_protocol.stream import MAX_MESSAGE, StreamDecoder, encode
from shuttle_protocol.stream_messages import (
    MAX_CHANNEL,
    MAX_CREDIT,
    MAX_DATA,
    MAX_DATAGRAM,
    Close,
    Credit,
    Data,
    Datagram,
    Error,
    Hello,
    Open,
    Ping,
    Refused,
    UdpOpen,
)

EDGES = [
    (lambda v: Open(v, "h", 1), 1, MAX_CHANNEL),
    (lambda v: Open(1, "h", v), 1, 65535),
    (lambda v: UdpOpen(v, "h", 1), 1, MAX_CHANNEL),
    (lambda v: UdpOpen(1, "h", v), 1, 65535),
    (lambda v: Refused(1, v, ""), 0, 4095),
    (lambda v: Credit(1, v), 1, MAX_CREDIT),
    (Ping, 0, 2**63 - 1),
    (lambda v: Hello(v, (), ""), 0, 2**31),
]


@pytest.mark.parametrize("build, low, high", EDGES)
def test_integer_ranges_are_closed(build: Callable[[int], Any], low: int, high: int) -> None:
    for value in (low, high):
        msg = build(value)
        assert StreamDecoder().feed(encode(msg)) == [msg]
    for value in (low - 1, high + 1):
        with pytest.raises(LocalProtocolError):
            build(value)


@pytest.mark.parametrize(
    "build, limit",
    [
        (lambda t: Open(1, t, 1), 255),
        (lambda t: UdpOpen(1, t, 1), 255),
        (lambda t: Refused(1, 0, t), 200),
        (lambda t: Close(1, t), 200),
        (Error, 1000),
        (lambda t: Hello(1, (t,), ""), 64),
        (lambda t: Hello(1, (), t), 200),
    ],
)
def test_text_limits_count_characters(build: Callable[[str], Any], limit: int) -> None:
    longest = build("\U0001f600" * limit)  # four bytes each in UTF-8
    assert StreamDecoder().feed(encode(longest)) == [longest]
    with pytest.raises(LocalProtocolError):
        build("a" * (limit + 1))


def test_capabilities_are_at_most_64() -> None:
    Hello(1, ("c",) * 64, "")
    with pytest.raises(LocalProtocolError):
        Hello(1, ("c",) * 65, "")


def test_the_largest_data_fits_in_one_stream_message() -> None:
    largest = Data(MAX_CHANNEL, b"\xff" * MAX_DATA)
    assert len(encode(largest)) <= MAX_MESSAGE
    assert StreamDecoder().feed(encode(largest)) == [largest]
    with pytest.raises(LocalProtocolError):
        Data(1, b"\xff" * (MAX_DATA + 1))


def test_the_largest_hello_fits_in_one_stream_message() -> None:
    largest = Hello(2**31, ("\U0001f600" * 64,) * 64, "\U0001f600" * 200)
    assert len(encode(largest)) <= MAX_MESSAGE
    assert StreamDecoder().feed(encode(largest)) == [largest]


def test_the_largest_datagram_fits_in_one_stream_message() -> None:
    largest = Datagram(MAX_CHANNEL, b"\xff" * MAX_DATAGRAM)
    assert len(encode(largest)) <= MAX_MESSAGE
    assert StreamDecoder().feed(encode(largest)) == [largest]
    with pytest.raises(LocalProtocolError):
        Datagram(1, b"\xff" * (MAX_DATAGRAM + 1))


def test_an_empty_datagram_is_a_datagram() -> None:
    empty = Datagram(1, b"")
    assert StreamDecoder().feed(encode(empty)) == [empty]

"""Latency control in the Mux: what outgoing() returns puts interactive channels' Data,
Credit and every other message before the frames of bulk channels (BULK bytes or more in
flight), so an echo never waits behind bulk data queued in the Mux; each channel's own
frames, its Eof among them, stay in order whatever its in-flight count does meanwhile."""

from typing import List

from hypothesis import given
from hypothesis import strategies as st
from shuttle_protocol.mux import BULK
from shuttle_protocol.schema import Message
from shuttle_protocol.stream_messages import MAX_DATA, Credit, Data, Eof, Ping

from .pair import Pair

WINDOW = 8 * MAX_DATA


def test_an_echo_and_a_credit_go_before_bulk_data_queued_with_them() -> None:
    pair = Pair(WINDOW)
    bulk, echo = pair.open(), pair.open()
    pair.agent.send_data(echo, b"question")
    pair.to_client()
    pair.client.send_data(bulk, b"b" * BULK)  # now bulk: BULK bytes in flight
    pair.client.outgoing()  # on its way
    pair.client.send_data(bulk, b"c" * MAX_DATA)
    pair.client.send_data(echo, b"answer")
    pair.client.delivered(echo, len(b"question"))
    pair.client.send(Ping(7))
    got = pair.agent.receive(b"".join(pair.client.outgoing()))
    assert got == [Data(echo, b"answer"), Ping(7), Credit(echo, 8), Data(bulk, b"c" * MAX_DATA)]


def test_a_channel_below_bulk_keeps_its_place() -> None:
    pair = Pair(WINDOW)
    first, second = pair.open(), pair.open()
    pair.client.send_data(first, b"a" * (BULK - 1))
    pair.client.send_data(second, b"b")
    pair.client.send_data(first, b"c")  # BULK - 1 in flight before it: not bulk yet
    pair.client.send_data(first, b"d")  # BULK in flight: bulk
    pair.client.send_data(second, b"e")
    got = pair.agent.receive(b"".join(pair.client.outgoing()))
    assert got == [
        Data(first, b"a" * (BULK - 1)),
        Data(second, b"b"),
        Data(first, b"c"),
        Data(second, b"e"),
        Data(first, b"d"),
    ]


@given(st.lists(st.sampled_from(["send", "grant", "eof"]), max_size=30))
def test_interactive_frames_first_and_each_channels_in_order(script: List[str]) -> None:
    """A model of the rule: a send of the bulk channel goes after the interactive channel's
    sends of the same flush once the channel has BULK in flight, and for the rest of that
    flush; its Eof goes with its frames."""
    pair = Pair(WINDOW)
    bulk, echo = pair.open(), pair.open()
    first: List[Message] = []  # expected, before the bulk queue
    last: List[Message] = []  # expected, the bulk queue
    in_flight = 0  # the bulk channel's
    for number, step in enumerate(script):
        if step == "eof":
            pair.client.send_eof(bulk)
            (last if last else first).append(Eof(bulk))
            break
        if step == "grant":  # everything arrives; the agent grants it all back
            assert pair.agent.receive(b"".join(pair.client.outgoing())) == first + last
            pair.agent.delivered(bulk, in_flight)
            pair.to_client()
            first, last, in_flight = [], [], 0
            continue
        size = min(BULK // 2, pair.client.credit(bulk))
        if size:
            payload = bytes([number % 256]) * size
            (last if last or in_flight >= BULK else first).append(Data(bulk, payload))
            pair.client.send_data(bulk, payload)
            in_flight += size
        pair.client.send_data(echo, b"e")
        first.append(Data(echo, b"e"))
    assert pair.agent.receive(b"".join(pair.client.outgoing())) == first + last

"""Mux.in_flight_on, each channel's part of in_flight: whatever both ends do, the parts add up
to the total, none is negative, and a channel that is gone or sent its Eof has none. The
relay relies on it to let a channel with nothing in flight read while bytes parked at the
peer keep the total above the limit."""

from typing import List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from shuttle_protocol.mux import AGENT, CLIENT, Mux
from shuttle_protocol.stream_messages import MAX_DATA, Close, Data

from .pair import Pair

WINDOW = 4 * MAX_DATA  # small, so that random sends reach it
CHANNELS = 3

Step = Tuple[str, int, int]  # what, which channel (index), how many bytes
steps = st.lists(
    st.tuples(
        st.sampled_from(["send", "deliver", "eof", "close", "peer_close"]),
        st.integers(0, CHANNELS - 1),
        st.integers(1, WINDOW),
    ),
    max_size=60,
)


def check(client: Mux, channels: List[int]) -> None:
    parts = [client.in_flight_on(channel) for channel in channels]
    assert all(part >= 0 for part in parts), parts
    assert sum(parts) == client.in_flight, (parts, client.in_flight)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_the_parts_add_up_to_in_flight(script: List[Step]) -> None:
    pair = Pair(WINDOW)
    channels = [pair.open() for _ in range(CHANNELS)]
    held = {channel: 0 for channel in channels}  # at the agent, not yet delivered
    for what, index, size in script:
        channel = channels[index]
        if what == "send":
            n = min(size, pair.client.credit(channel))
            if n:
                pair.client.send_data(channel, b"x" * n)
        elif what == "deliver":
            n = min(size, held[channel])
            pair.agent.delivered(channel, n)
            held[channel] -= n
        elif what == "eof":
            pair.client.send_eof(channel)
        elif what == "close":
            pair.client.close(channel, "test")
        elif what == "peer_close" and channel in pair.agent.channels:
            pair.agent.close(channel, "test")
            held[channel] = 0
        for msg in pair.to_agent():
            if isinstance(msg, Data):
                held[msg.channel] += len(msg.payload)
            elif isinstance(msg, Close):
                held[msg.channel] = 0
        pair.to_client()
        check(pair.client, channels)
    for channel in channels:
        if channel not in pair.client.channels or pair.client.channels[channel].eof_sent:
            assert pair.client.in_flight_on(channel) == 0


def test_a_channel_nobody_opened_has_nothing_in_flight() -> None:
    assert Mux(CLIENT).in_flight_on(7) == 0
    assert Mux(AGENT).in_flight_on(7) == 0

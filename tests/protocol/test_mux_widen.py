"""Mux window widening: a receiver whose socket took a window's worth of bytes as they came
doubles the window, up to max_window per channel and WIDEN_BUDGET per Mux; one that holds
bytes does not; the sender's in-flight count stays the sum of its channels' parts, and
exact: a Widen grants nothing back."""

from typing import List

import pytest
from shuttle_protocol.errors import LocalProtocolError
from shuttle_protocol.mux import AGENT, MAX_WINDOW, WIDEN_BUDGET, Mux
from shuttle_protocol.schema import Message
from shuttle_protocol.stream_messages import MAX_DATA, Data, Widen

from .pair import Pair

WINDOW = 4 * MAX_DATA
CHUNK = b"x" * MAX_DATA


def round_trip(pair: Pair, channel: int, deliver_all: bool = True) -> int:
    """The client sends all its credit; the agent delivers it (all, or all but one byte)
    and grants; returns the bytes that the agent holds undelivered."""
    credit = pair.client.credit(channel)
    for start in range(0, credit, MAX_DATA):
        pair.client.send_data(channel, CHUNK[: min(MAX_DATA, credit - start)])
    received = sum(len(msg.payload) for msg in pair.to_agent() if isinstance(msg, Data))
    held = 0 if deliver_all else 1
    pair.agent.delivered(channel, received - held)
    pair.to_client()
    return held


def test_a_receiver_that_keeps_up_doubles_the_window_up_to_max_window() -> None:
    pair = Pair(WINDOW, 8 * WINDOW)
    channel = pair.open()
    windows: List[int] = []
    for _ in range(6):
        round_trip(pair, channel)
        windows.append(pair.client.credit(channel))
    assert windows == [2 * WINDOW, 4 * WINDOW, 8 * WINDOW, 8 * WINDOW, 8 * WINDOW, 8 * WINDOW]
    assert pair.agent.channels[channel].recv_window == 8 * WINDOW
    assert pair.client.in_flight == 0 == pair.client.in_flight_on(channel)


def test_a_window_widens_when_bytes_trickle_in_and_go_back_at_once() -> None:
    # A long link: the receiver sees the sender's window a piece at a time and grants each
    # piece back at once, so it never sees much of the window used.
    pair = Pair(WINDOW, 8 * WINDOW)
    channel = pair.open()
    windows = []
    for _ in range(12):
        pair.client.send_data(channel, CHUNK)
        for msg in pair.to_agent():
            pair.agent.delivered(channel, len(msg.payload))
        pair.to_client()
        windows.append(pair.agent.channels[channel].recv_window // MAX_DATA)
    assert windows == [4, 4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 16]  # after 4 pieces, then 8 more


def test_a_receiver_that_holds_bytes_does_not_widen() -> None:
    pair = Pair(WINDOW, 8 * WINDOW)
    channel = pair.open()
    held = 0
    for _ in range(4):
        held = round_trip(pair, channel, deliver_all=False) + held
    assert pair.agent.channels[channel].recv_window == WINDOW
    assert pair.client.credit(channel) == WINDOW - held


def test_without_max_window_nothing_widens() -> None:
    pair = Pair(WINDOW)
    channel = pair.open()
    for _ in range(3):
        round_trip(pair, channel)
    assert pair.client.credit(channel) == WINDOW


def test_in_flight_stays_the_sum_of_the_parts_while_windows_widen() -> None:
    pair = Pair(WINDOW, 8 * WINDOW)
    first, second = pair.open(), pair.open()
    for _ in range(4):
        round_trip(pair, first)
        pair.client.send_data(second, CHUNK)  # stays in flight: never delivered
        pair.to_agent()
        parts = pair.client.in_flight_on(first) + pair.client.in_flight_on(second)
        assert pair.client.in_flight == parts == pair.client.in_flight_on(second)


def test_all_widening_together_stays_within_the_budget() -> None:
    pair = Pair(MAX_WINDOW // 2, MAX_WINDOW)  # each channel widens by MAX_WINDOW // 2 once
    channels = [pair.open() for _ in range(WIDEN_BUDGET // (MAX_WINDOW // 2) + 2)]
    for channel in channels:
        round_trip(pair, channel)
    assert pair.agent.widened == WIDEN_BUDGET
    windows = [pair.agent.channels[channel].recv_window for channel in channels]
    assert windows[-2:] == [MAX_WINDOW // 2] * 2


def test_a_max_window_below_the_window_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        Mux(AGENT, WINDOW, WINDOW - 1)


def test_widening_is_no_grant_so_in_flight_stays_exact_with_bytes_on_their_way() -> None:
    # A long link: each grant comes back after the next chunk went out, so one chunk is
    # always on its way when the receiver widens. Were the widening counted as a grant
    # (extra Credit), that chunk would read as granted: the in-flight controller then
    # timed a round trip of a millisecond on a 40 ms link and kept the limit at its minimum.
    pair = Pair(WINDOW, 8 * WINDOW)
    channel = pair.open()
    late = b""  # the agent's grants, not yet arrived
    seen: List[Message] = []
    for _ in range(12):
        pair.client.send_data(channel, CHUNK)
        for msg in pair.to_agent():
            pair.agent.delivered(channel, len(msg.payload))
        seen += pair.client.receive(late)
        late = b"".join(pair.agent.outgoing())
        assert pair.client.in_flight == MAX_DATA == pair.client.in_flight_on(channel)
    assert Widen(channel, WINDOW) in seen
    assert pair.client.credit(channel) == 2 * WINDOW - MAX_DATA


def test_a_window_widened_one_way_leaves_the_other_ways_count_alone() -> None:
    # An upload widens the agent's receiving window; the agent's own sending on the same
    # channel still has the client's window. Once one window stood for both, the agent's
    # in-flight count took the widened one: it read megabytes in flight that were never
    # sent, and a closed channel settled them, driving the count below zero for good.
    pair = Pair(WINDOW, 8 * WINDOW)
    channel = pair.open()
    for _ in range(3):
        round_trip(pair, channel)
    assert pair.agent.channels[channel].recv_window == 8 * WINDOW
    pair.agent.send_data(channel, b"y" * 100)
    assert pair.agent.in_flight == 100 == pair.agent.in_flight_on(channel)
    assert pair.agent.credit(channel) == WINDOW - 100
    pair.agent.forget(channel)
    assert (pair.agent.in_flight, pair.agent.settled_total) == (0, 100)

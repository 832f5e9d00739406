"""How many agent sessions the measured bandwidth-delay products ask for
(shuttle_client.agent_sessions.wanted_sessions): none more while no session is held back by
its ssh window; enough windows for all of it, and SPARE with room, once one is; one more, a
quiet lane, while every session is busy. And which sessions are busy (AgentSessions.busy,
which streams.pick steers new channels away from): those that carried BUSY_RATE at the last
measure, until the bulk channels that carried it close (or the next measure, if there are
none to watch)."""

from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import pytest
from shuttle_client.agent_sessions import (
    BULK_BYTES,
    BUSY_RATE,
    MAX_SESSIONS,
    MAX_WATCHED,
    SATURATED,
    SPARE,
    SSH_WINDOW,
    WATCH_INTERVAL,
    AgentSessions,
    bulk_channels,
    wanted_sessions,
)
from shuttle_protocol.inflight import BULK_TARGET, MIN_TARGET, InFlightController
from shuttle_protocol.schema import Message
from shuttle_protocol.stream_messages import Pace

FULL = SATURATED * SSH_WINDOW  # a session held back by its window


@pytest.mark.parametrize(
    ("products", "wanted"),
    [
        ([0.0], 1),  # idle
        ([FULL * 0.99], 1),  # busy, but the window is not what holds it back
        ([FULL * 0.5, FULL * 0.9], 2),  # none held back: nothing changes
        ([FULL], 1 + SPARE),  # held back by its window: SPARE more sessions with room
        ([FULL * 1.2], 2 + SPARE),  # more than it, seen through one window
        ([FULL, FULL * 0.2], 2 + SPARE),
        ([FULL, FULL, FULL], 3 + SPARE),
        ([FULL * 3, 0.0], 3 + SPARE),
        ([FULL] * 20, 20),  # never fewer than there are
        ([FULL * 100], MAX_SESSIONS),  # at most MAX_SESSIONS
    ],
)
def test_wanted_sessions(products: list, wanted: int) -> None:
    assert wanted_sessions(products, [False] * len(products)) == wanted


@pytest.mark.parametrize(
    ("products", "busy", "wanted"),
    [
        ([0.0], [True], 2),  # a bulk transfer on a short link: a quiet lane beside it
        ([0.0, 0.0], [True, False], 2),  # the quiet lane is there
        ([0.0, 0.0], [True, True], 3),  # both carry bulk: one more
        ([FULL], [True], 1 + SPARE),  # held back by the window: the SPARE ones are quiet
        ([0.0] * MAX_SESSIONS, [True] * MAX_SESSIONS, MAX_SESSIONS),  # at most MAX_SESSIONS
        ([], [], 0),
    ],
)
def test_a_quiet_lane_while_every_session_is_busy(products: list, busy: list, wanted: int) -> None:
    assert wanted_sessions(products, busy) == wanted


def test_one_busy_flag_per_session() -> None:
    with pytest.raises(ValueError):
        wanted_sessions([0.0, 0.0], [True])


@pytest.mark.parametrize(
    ("carried", "bulk"),
    [
        ({1: BULK_BYTES, 2: 10, 3: BULK_BYTES * 9}, {1, 3}),  # the bulk ones
        ({1: 10, 2: 20}, None),  # many small transfers made it busy: until the next measure
        ({}, None),
        (dict.fromkeys(range(MAX_WATCHED + 1), BULK_BYTES), None),  # too many to watch
        (dict.fromkeys(range(MAX_WATCHED), BULK_BYTES), set(range(MAX_WATCHED))),
    ],
)
def test_bulk_channels(carried: Dict[int, int], bulk: Optional[set]) -> None:
    assert bulk_channels(carried) == bulk


class FakeLink:
    """What AgentSessions reads of a Link: the Mux's counters, the open channels' byte
    counts, the UDP flows, the in-flight controller (a real one, its base round trip set);
    and what it sends."""

    def __init__(self, channels: Dict[int, int], flows: tuple = ()) -> None:
        self.mux = SimpleNamespace(sent_total=0, received_total=0)
        self.channels = {
            channel: SimpleNamespace(bytes_in=0, bytes_out=count)
            for channel, count in channels.items()
        }
        self.flows = dict.fromkeys(flows)
        self.in_flight = InFlightController()
        self.in_flight.observe(0.0, 1, 0, 0)
        self.in_flight.observe(0.0001, 1, 1, 0)  # one sample: a base round trip of 0.1 ms
        self.closed = SimpleNamespace(done=lambda: False)
        self.sent: List[Message] = []

    def send(self, msg: Message) -> None:
        self.sent.append(msg)


def carry(link: Any, count: int) -> None:
    link.mux.sent_total += count
    for relay in link.channels.values():
        relay.bytes_out += count


def test_a_session_is_busy_until_its_bulk_channels_close() -> None:
    sessions = AgentSessions(SimpleNamespace())  # type: ignore[arg-type]
    bulk, quiet = FakeLink({1: 0, 2: 0}), FakeLink({})
    sessions.measure([bulk, quiet])  # the first measure only takes the counters
    assert sessions.busy == set()
    carry(bulk, int(BUSY_RATE * WATCH_INTERVAL))
    bulk.channels[3] = SimpleNamespace(bytes_in=0, bytes_out=100)  # a small one, opened since
    assert sessions.measure([bulk, quiet]) == 2  # a quiet lane is there
    assert sessions.busy == {bulk}
    del bulk.channels[1]
    assert sessions.busy == {bulk}  # channel 2 still carries bulk
    del bulk.channels[2]
    # Only the small channel is left: a new connection may go there again, before the
    # next measure, so that a burst after a bulk transfer spreads over every session.
    assert sessions.busy == set()
    sessions.measure([bulk, quiet])
    assert sessions.busy == set()


def test_a_session_busy_with_no_bulk_channel_stays_busy_until_the_next_measure() -> None:
    sessions = AgentSessions(SimpleNamespace())  # type: ignore[arg-type]
    link = FakeLink({1: 0}, flows=(7,))
    sessions.measure([link])
    link.mux.received_total += int(BUSY_RATE * WATCH_INTERVAL)  # a UDP flood, say
    assert sessions.measure([link]) == 2
    del link.channels[1]
    del link.flows[7]
    assert sessions.busy == {link}
    sessions.measure([link])  # carried nothing since
    assert sessions.busy == set()


def floors(*links: FakeLink) -> List[float]:
    return [link.in_flight.floor for link in links]


def test_a_bulk_transfer_alone_may_queue_more_until_anything_shares_the_connection() -> None:
    """Pace: BULK_TARGET, here and at the agent, while a busy session is all that carried
    bytes in the last measure; MIN_TARGET again as soon as anything else did (another
    session, a small channel beside the bulk one, a UDP flow)."""
    sessions = AgentSessions(SimpleNamespace())  # type: ignore[arg-type]
    bulk, quiet = FakeLink({1: 0}), FakeLink({2: 0})
    links = [bulk, quiet]
    sessions.measure(links)
    assert floors(bulk, quiet) == [MIN_TARGET] * 2 and bulk.sent == quiet.sent == []

    def move(link: FakeLink, channel: int, count: int) -> None:
        link.mux.sent_total += count
        link.channels[channel].bytes_out += count

    bulk_bytes = int(BUSY_RATE * WATCH_INTERVAL)
    move(bulk, 1, bulk_bytes)
    sessions.measure(links)
    assert floors(bulk, quiet) == [BULK_TARGET] * 2
    assert bulk.sent == quiet.sent == [Pace(round(BULK_TARGET * 1_000_000))]
    move(bulk, 1, bulk_bytes)
    sessions.measure(links)
    assert len(bulk.sent) == 1  # no change, nothing sent
    move(bulk, 1, bulk_bytes)
    move(quiet, 2, 100)  # an echo in the quiet lane
    sessions.measure(links)
    assert floors(bulk, quiet) == [MIN_TARGET] * 2
    assert bulk.sent[-1] == quiet.sent[-1] == Pace(round(MIN_TARGET * 1_000_000))
    move(bulk, 1, bulk_bytes)
    sessions.measure(links)
    assert floors(bulk, quiet) == [BULK_TARGET] * 2
    bulk.channels[3] = SimpleNamespace(bytes_in=0, bytes_out=0)
    move(bulk, 1, bulk_bytes)
    move(bulk, 3, 10)  # a small connection beside the bulk one, in its session
    sessions.measure(links)
    assert floors(bulk, quiet) == [MIN_TARGET] * 2
    move(bulk, 1, bulk_bytes)  # channel 3 is still open but quiet
    sessions.measure(links)
    assert floors(bulk, quiet) == [BULK_TARGET] * 2
    quiet.flows[9] = None  # a UDP flow (DNS, a call): what it carries is not counted
    move(bulk, 1, bulk_bytes)
    sessions.measure(links)
    assert floors(bulk, quiet) == [MIN_TARGET] * 2
    del quiet.flows[9]
    sessions.measure(links)  # the bulk transfer ended: nothing is busy
    assert floors(bulk, quiet) == [MIN_TARGET] * 2

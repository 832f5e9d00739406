"""The in-flight controller against simulated links in virtual time: a sender bounded by the
controller's limit, a FIFO queue in front of a bottleneck of fixed bandwidth, a delay each
way, and a receiver that grants every byte back as it arrives. Nothing here reads a clock;
the assertions are on the share of the bandwidth used and on the queue's size."""

from collections import deque
from typing import Deque, List, Tuple

import pytest
from shuttle_protocol.errors import LocalProtocolError
from shuttle_protocol.inflight import (
    BASE_BUCKETS,
    BULK_TARGET,
    INITIAL_LIMIT,
    MAX_FLOOR,
    MIN_LIMIT,
    MIN_TARGET,
    InFlightController,
)

MB = 1_000_000
STEP = 0.0005  # seconds of virtual time per step


class Link:
    """A bottleneck of `bandwidth` bytes/s behind a FIFO queue, `delay` seconds each way."""

    def __init__(self, bandwidth: float, delay: float) -> None:
        self.bandwidth = bandwidth
        self.delay = delay
        self.queue = 0.0  # bytes waiting for the bottleneck
        self.sent = 0  # by the sender, in all
        self.retired = 0  # granted back to the sender, in all
        self.delivered = 0.0  # reached the receiver, in all
        self._to_receiver: Deque[Tuple[float, float]] = deque()  # (arrival time, bytes)
        self._to_sender: Deque[Tuple[float, float]] = deque()  # grants (arrival time, bytes)
        self._granted = 0.0
        self.clock = 0.0  # virtual time, seconds

    def step(self, now: float, limit: int) -> None:
        while self._to_receiver and self._to_receiver[0][0] <= now:
            _, size = self._to_receiver.popleft()
            self.delivered += size
            self._to_sender.append((now + self.delay, size))
        while self._to_sender and self._to_sender[0][0] <= now:
            self._granted += self._to_sender.popleft()[1]
        self.retired = int(self._granted)
        room = limit - (self.sent - self.retired)
        if room > 0:
            self.sent += room
            self.queue += room
        out = min(self.queue, self.bandwidth * STEP)
        if out:
            self.queue -= out
            self._to_receiver.append((now + self.delay, out))


def run(
    link: Link, controller: InFlightController, seconds: float
) -> Tuple[float, float, List[int]]:
    """Run the link for seconds of virtual time; return the throughput (bytes/s) and the
    largest queue (bytes) over the second half, and the limits seen there."""
    steps = int(seconds / STEP)
    start = link.delivered
    largest = 0.0
    limits = []
    half = steps // 2
    for i in range(steps):
        now = link.clock + i * STEP
        link.step(now, controller.limit)
        controller.observe(now, link.sent, link.retired, 0)
        if i == half:
            start = link.delivered
        if i >= half:
            largest = max(largest, link.queue)
            limits.append(controller.limit)
    link.clock += steps * STEP
    return (link.delivered - start) / ((steps - half) * STEP), largest, limits


@pytest.mark.parametrize(
    ("bandwidth", "delay"),
    [(50 * MB, 0.020), (50 * MB, 0.050), (200 * MB, 0.020), (300 * MB, 0.0001)],
    ids=["50MB/s+20ms", "50MB/s+50ms", "200MB/s+20ms", "300MB/s-lan"],
)
def test_fills_the_link_and_keeps_the_queue_short(bandwidth: float, delay: float) -> None:
    link = Link(bandwidth, delay)
    controller = InFlightController()
    throughput, largest, _ = run(link, controller, 20.0)
    rtt = 2 * delay
    assert throughput >= 0.8 * bandwidth, (throughput / bandwidth, controller.limit)
    # An echo behind the queue waits at most two more base round trips (the target:
    # echo <= 3x idle), or a few milliseconds (MIN_LIMIT's worth) on a short link.
    assert largest <= bandwidth * max(2 * rtt, 0.004), (largest / bandwidth, rtt)


def test_grows_past_the_old_fixed_limit_on_a_long_link() -> None:
    link = Link(50 * MB, 0.020)  # bandwidth-delay product: 2 MB
    controller = InFlightController()
    run(link, controller, 5.0)
    assert controller.limit > 2 * INITIAL_LIMIT
    assert controller.base_rtt is not None and controller.base_rtt == pytest.approx(0.040)


def test_shrinks_when_the_link_slows_down() -> None:
    link = Link(200 * MB, 0.020)
    controller = InFlightController()
    run(link, controller, 10.0)
    fast_limit = controller.limit
    link.bandwidth = 20 * MB  # the route got ten times slower: the queue builds
    throughput, largest, limits = run(link, controller, 20.0)
    assert max(limits) < fast_limit / 4
    assert throughput >= 0.8 * link.bandwidth
    assert largest <= link.bandwidth * 2 * 0.040


def test_an_idle_sender_does_not_grow_the_limit() -> None:
    controller = InFlightController()
    clock = 0.0
    sent = 0
    for _ in range(1000):  # one small write per 40 ms round trip, granted a round trip later
        sent += 100
        controller.observe(clock, sent, sent - 100, 0)
        clock += 0.040
    assert controller.samples > 100
    assert controller.limit == INITIAL_LIMIT


def test_a_settled_mark_gives_no_sample() -> None:
    controller = InFlightController()
    controller.observe(0.0, 1000, 0, 0)
    controller.observe(0.000001, 1000, 1000, 1000)  # the channel closed: never granted
    assert controller.samples == 0
    controller.observe(0.1, 2000, 1000, 1000)
    controller.observe(0.2, 2000, 2000, 1000)
    assert controller.samples == 1 and controller.last_rtt == pytest.approx(0.1)


def test_a_byte_that_waited_is_not_timed_from_now() -> None:
    controller = InFlightController()
    controller.observe(0.0, 1000, 0, 0)  # timed: sent now
    controller.observe(0.001, 2000, 0, 0)  # more sent while the first is timed
    controller.observe(0.040, 2000, 1000, 0)  # the first one's grant: one round trip
    controller.observe(0.041, 2000, 2000, 0)  # the second's, sent 40 ms ago, not 1 ms
    assert controller.samples == 1
    assert controller.base_rtt == pytest.approx(0.040)


def test_memory_is_bounded_and_the_base_is_relearnt() -> None:
    controller = InFlightController()
    clock = 0.0
    sent = 0
    for rtt in [0.001] * 100 + [0.050] * 1000:  # the route changed: a longer round trip
        sent += MIN_LIMIT
        controller.observe(clock, sent, sent - MIN_LIMIT, 0)
        clock += rtt
    assert len(controller._buckets) == BASE_BUCKETS
    assert controller.base_rtt == pytest.approx(0.050)
    assert MIN_LIMIT <= controller.limit


def test_bad_limits_are_refused() -> None:
    with pytest.raises(LocalProtocolError):
        InFlightController(initial=1, minimum=2)


@pytest.mark.parametrize(
    ("bandwidth", "delay"), [(300 * MB, 0.0001), (200 * MB, 0.0005)], ids=["300MB/s", "200MB/s"]
)
def test_the_floor_is_the_queue_allowed_on_a_short_link(bandwidth: float, delay: float) -> None:
    """A bulk transfer alone may queue up to BULK_TARGET (the client's Pace says when); with
    anything beside it, MIN_TARGET. Both fill the link."""
    largest = {}
    for floor in (MIN_TARGET, BULK_TARGET):
        link = Link(bandwidth, delay)
        controller = InFlightController()
        controller.set_floor(floor)
        throughput, largest[floor], _ = run(link, controller, 10.0)
        assert throughput >= 0.95 * bandwidth
        assert largest[floor] <= bandwidth * (floor + 4 * delay), largest[floor] / bandwidth
    assert largest[BULK_TARGET] > 2 * largest[MIN_TARGET]


@pytest.mark.parametrize("floor", [0.0, MIN_TARGET / 2, MAX_FLOOR * 2, float("nan")])
def test_a_floor_out_of_bounds_is_refused(floor: float) -> None:
    controller = InFlightController()
    with pytest.raises(LocalProtocolError):
        controller.set_floor(floor)
    assert controller.floor == MIN_TARGET

"""Sans-IO delay-based controller of a session's in-flight limit (the Data bytes sent and not
yet granted back that the driver lets the channels queue towards the peer).

A fixed limit is either too small for a long link (it caps a session near one limit per
round trip) or too big for a short one (a bulk transfer queues that much in ssh's buffers in
front of every interactive byte). So the limit follows the link, in the spirit of LEDBAT
(RFC 6817): the driver reports the Mux's byte counters with the time; the controller times
one byte position at a time from its send to its grant (one round-trip sample per round
trip), keeps the minimum as the base round trip (over a bounded window of recent samples, so
a route change is learnt), and reads the least of two samples in a row, less the base, as
the queueing delay (one late wakeup of a loaded host is no queue). While it stays under the
target (half the base round trip, at least the floor: MIN_TARGET, or more where the client
says only a bulk transfer would wait, set_floor), a limit that was in use grows by up to
half its size; above the target the limit shrinks to what would make the round trip base
plus target at the rate just seen. After a change the next sample is skipped: it timed a
byte sent under the old limit. Every PROBE_EVERY samples the limit drops to its minimum
for PROBE_ROUNDS round trips, so that the queue drains and the base stays true. Memory is
constant: one pending mark, two samples and BASE_BUCKETS minima.

The timed position is a count over all channels, so bytes that a stopped program leaves
parked at the peer delay its grant; samples then read high and the limit shrinks, which is
the safe direction. Bytes that stop counting without a grant (a closed channel) make the
sample meaningless: it is dropped.
"""

from typing import List, Optional, Tuple

from .errors import LocalProtocolError

KIB = 1024
MIN_LIMIT = 256 * KIB  # never less: a short link needs a few reads in flight to stay busy
INITIAL_LIMIT = 512 * KIB  # the old fixed limit: a safe start before the first sample
MAX_LIMIT = 64 * 1024 * KIB  # 64 MiB: 1 GB/s at 64 ms; beyond it memory matters more
MIN_TARGET = 0.001  # seconds of queueing always allowed: a host's own scheduling jitter
# The floor of the target while a bulk transfer has the ssh connection to itself (the client
# says so with Pace; agent_sessions.py): on the bench's plain network the agent's bulk was
# 0.36x / 0.46x ssh -L's with MIN_TARGET; 0.54x / 0.70x with 4 ms and 0.66-0.68x /
# 0.68-0.79x with 8 ms in the same session, and 16 ms gained nothing more (docs/performance.md).
BULK_TARGET = 0.008
MAX_FLOOR = 0.1  # seconds: a floor beyond it would be a queue, not a margin
TARGET_SHARE = 0.5  # of the base round trip: queueing allowed before the limit shrinks
GAIN = 0.5  # growth per round trip at no queueing: less than doubling limits the overshoot
# The queueing delay is read from the least of CURRENT_SAMPLES samples in a row (LEDBAT's
# current delay filter): one late wakeup of a loaded host is no queue.
CURRENT_SAMPLES = 2
# While the link is busy, every sample includes the queue that the limit itself keeps, and
# the base would creep up with it; so every PROBE_EVERY samples the limit drops to its
# minimum for PROBE_ROUNDS round trips and the queue drains (BBR's ProbeRTT).
PROBE_EVERY = 100
PROBE_ROUNDS = 2
BUCKET_SAMPLES = 32  # samples per bucket of the base round trip's history
BASE_BUCKETS = 8  # buckets kept: the base round trip is forgotten after 256 samples


class InFlightController:
    """Follows one direction of one session: call observe() on every flush and every
    receive, and read limit."""

    def __init__(
        self, initial: int = INITIAL_LIMIT, minimum: int = MIN_LIMIT, maximum: int = MAX_LIMIT
    ) -> None:
        if not 0 < minimum <= initial <= maximum:
            raise LocalProtocolError(
                "in-flight limits must satisfy 0 < minimum <= initial <= maximum"
            )
        self.limit = initial
        self.minimum = minimum
        self.floor = MIN_TARGET  # the least target, seconds (set_floor)
        self.maximum = maximum
        self.samples = 0  # round-trip samples taken
        self.last_rtt: Optional[float] = None
        # The timed position: (time sent, sent count to be granted, settled count then,
        # whether the limit was in use).
        self._mark: Optional[Tuple[float, int, int, bool]] = None
        self._buckets: List[float] = []  # minima of the last BASE_BUCKETS buckets
        self._bucket_min = float("inf")
        self._bucket_count = 0
        self._sent_seen = 0  # the sent count at the last call
        self._recent: List[float] = []  # samples since the last decision
        self._settling = False  # skip the next sample: it predates the last change
        self._until_probe = PROBE_EVERY
        self._probe_rounds = 0
        self._saved_limit = initial

    @property
    def base_rtt(self) -> Optional[float]:
        """The smallest recent round trip, in seconds (None before the first sample)."""
        low = min([*self._buckets, self._bucket_min])
        return None if low == float("inf") else low

    @property
    def target(self) -> float:
        """The queueing delay, in seconds, above which the limit shrinks."""
        base = self.base_rtt
        return self.floor if base is None else max(self.floor, base * TARGET_SHARE)

    def set_floor(self, seconds: float) -> None:
        """The least target from now: MIN_TARGET where interactive bytes may wait behind
        the queue, more (BULK_TARGET) where only a bulk transfer would."""
        if not MIN_TARGET <= seconds <= MAX_FLOOR:
            raise LocalProtocolError(
                f"a queueing floor must be in [{MIN_TARGET}, {MAX_FLOOR}] s, not {seconds!r}"
            )
        self.floor = seconds

    def observe(self, now: float, sent: int, retired: int, settled: int) -> None:
        """Counters of the Mux at time now (seconds, monotonic): Data bytes sent in all,
        of those no longer in flight (granted back or settled), and of those settled (their
        channel went without granting them)."""
        mark = self._mark
        if mark is not None and retired >= mark[1]:
            self._mark = None
            if settled == mark[2]:
                self._sample(now - mark[0], mark[3])
        # Only a byte sent since the last call is timed from now: one that waited in the
        # Mux (its channel stalled) would read a round trip too short, and the base with it.
        if self._mark is None and sent > max(retired, self._sent_seen):
            in_use = sent - retired >= self.limit // 2
            self._mark = (now, sent, settled, in_use)
        self._sent_seen = sent

    def _sample(self, rtt: float, in_use: bool) -> None:
        rtt = max(rtt, 0.0)
        self.samples += 1
        self.last_rtt = rtt
        self._bucket_min = min(self._bucket_min, rtt)
        self._bucket_count += 1
        if self._bucket_count == BUCKET_SAMPLES:
            self._buckets = [*self._buckets, self._bucket_min][-BASE_BUCKETS:]
            self._bucket_min = float("inf")
            self._bucket_count = 0
        if self._probe_rounds:  # the limit is at its minimum so that the queue drains
            self._probe_rounds -= 1
            if not self._probe_rounds:
                self.limit, self._settling = self._saved_limit, True
            return
        if self._settling:  # this byte left under the limit before the last change
            self._settling = False
            return
        base = self.base_rtt
        if base is None:
            return
        self._until_probe -= 1
        if not self._until_probe:
            self._until_probe = PROBE_EVERY
            self._saved_limit, self.limit = self.limit, self.minimum
            self._probe_rounds = PROBE_ROUNDS
            return
        self._recent.append(rtt)
        if len(self._recent) < CURRENT_SAMPLES:
            return
        before = self.limit
        target = self.target
        current = min(self._recent)
        self._recent.clear()
        queueing = current - base
        if queueing <= target:
            if in_use:  # a limit nobody reached says nothing about the link
                grown = self.limit + int(self.limit * GAIN * (1.0 - queueing / target))
                self.limit = min(self.maximum, grown)
        else:
            # The link carried about limit per rtt: this limit would make the round trip
            # base + target at that rate.
            self.limit = max(self.minimum, int(self.limit * (base + target) / current))
        self._settling = self.limit != before

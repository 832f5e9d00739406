"""The worker thread: applies the requests that change rules, one at a time and off the loop,
and closes the sessions whose lease ran out or whose opener exited; the loop answers
heartbeats, ListSessions, ZAP and the fd socket meanwhile.

Requests wait in a queue per uid and are taken from each uid in turn: however much one member
sends, another member's request waits for at most one request of each other uid. A uid may
have MAX_PENDING_PER_UID requests waiting or being applied, everyone together MAX_PENDING;
more are answered "busy" at once, so what waits here (frames of at most MEMBER_MAX_FRAME
bytes for a member) is bounded.

While it runs, Python's cyclic garbage collector runs only here, when no request waits, at
most every COLLECT_EVERY seconds: a full collection holds the GIL for as long as it walks
every object, and with 100,000 targets in flight that held the loop's thread for up to two
seconds (gen2 collections came every few hundred milliseconds during an update). Reference
counting frees everything else as before.
"""

from __future__ import annotations

import gc
import itertools
import logging
import select
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from .sessions import Sessions

log = logging.getLogger(__name__)

MAX_PENDING_PER_UID = 2  # a client sends one request at a time: two allow a second client
MAX_PENDING = 32
# uids whose last turn is remembered: one forgotten counts as never served, a small favour
# that only uids beyond this many could get.
MAX_SERVED = 1024
EXPIRE_EVERY = 0.5  # seconds between looks at the leases while no request comes
COLLECT_EVERY = 60.0  # seconds between garbage collections, at the least
# How long the worker may hold the GIL while the loop waits for it (Python's default: 5 ms).
# The worker's Python work on 100,000 targets was one long run (a child does it now, see
# offload.py, but a request of 2,000 targets is still made here); at 5 ms a turn, the loop's
# answers took a median of 37 ms and at most 0.21 s during a member's flood, at 1 ms 7 ms
# and 0.09 s (tests/firewalld/test_limits.py, -s prints them).
SWITCH_INTERVAL = 0.001


@dataclass(frozen=True)
class Job:
    """One request frame for the worker, and where its answer goes."""

    identity: bytes  # the ROUTER's name for the connection it came on
    uid: int
    payload: bytes
    session: str | None  # the session it names, if it names one (see server.peek)
    pid: int | None = None  # the caller's process, as ZAP gave it


class Worker:
    """The thread, its queues, and the answers it has made, for the loop to send."""

    def __init__(self, sessions: Sessions, work: Callable[[int, bytes, int | None], bytes]) -> None:
        """work: the answer frame to a request frame of a uid and pid (server.answer)."""
        self._sessions = sessions
        self._work = work
        self._ready = threading.Condition()
        self._queues: dict[int, deque[Job]] = {}  # by uid, of those with jobs waiting
        # The turn each uid was last served at: the uid served longest ago (or never) goes
        # first, even if its queue ran empty in between and it sends again later.
        self._served: dict[int, int] = {}
        self._turns = itertools.count()
        self._pending: Counter[int] = Counter()  # per uid: waiting or being applied
        self._busy: Counter[str] = Counter()  # session ids with a request waiting or applied
        self._stopping = False
        self._switch_interval = sys.getswitchinterval()  # start() sets ours, stop() this again
        self._answers: deque[tuple[bytes, bytes]] = deque()  # (identity, answer frame)
        # One byte per answer made wakes the loop's poller; the loop reads them all at once.
        self._wake, self._woken = socket.socketpair()
        self._wake.setblocking(False)
        self._woken.setblocking(False)
        # The loop's byte to the worker: a job came, or stop. The worker waits on it and on
        # the openers' exits at once, so a dead client's rules go at once, not at a tick.
        self._kick, self._kicked = socket.socketpair()
        self._kick.setblocking(False)
        self._kicked.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="shuttle-worker", daemon=True)

    def fileno(self) -> int:
        """Readable when answers are ready (for the loop's poller)."""
        return self._woken.fileno()

    def start(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL)
        gc.disable()
        self._thread.start()

    def stop(self) -> None:
        """Let the request being applied finish; drop those waiting (their callers time out)."""
        with self._ready:
            self._stopping = True
        _poke(self._kick)
        if self._thread.is_alive():
            self._thread.join()
        gc.enable()
        sys.setswitchinterval(self._switch_interval)
        for end in (self._wake, self._woken, self._kick, self._kicked):
            end.close()

    def submit(self, job: Job) -> str | None:
        """Queue the job; or, when its uid or everyone has too many, why not (the answer)."""
        with self._ready:
            refusal = self._refusal(job.uid)
            if refusal is not None:
                return refusal
            self._queues.setdefault(job.uid, deque()).append(job)
            self._pending[job.uid] += 1
            if job.session is not None:
                self._busy[job.session] += 1
        _poke(self._kick)
        return None

    def full(self, uid: int) -> str | None:
        """Why a job of uid's would be refused now (as submit would answer), or None."""
        with self._ready:
            return self._refusal(uid)

    def _refusal(self, uid: int) -> str | None:
        """Under _ready."""
        if self._pending[uid] >= MAX_PENDING_PER_UID:
            return (
                f"busy: uid {uid} has {MAX_PENDING_PER_UID} requests waiting or being "
                "applied; send this one again once one is answered"
            )
        if sum(self._pending.values()) >= MAX_PENDING:
            return f"busy: {MAX_PENDING} requests wait already; send this one again soon"
        return None

    def answers(self) -> list[tuple[bytes, bytes]]:
        """The answers made since the last call, as (identity, frame), in order."""
        _drain(self._woken)
        done = []
        while self._answers:
            done.append(self._answers.popleft())
        return done

    def _next(self) -> Job | None:
        """The oldest job of the uid served longest ago; under _ready."""
        if not self._queues:
            return None
        uid = min(self._queues, key=lambda uid: self._served.get(uid, -1))
        queue = self._queues[uid]
        job = queue.popleft()
        if not queue:
            del self._queues[uid]
        self._served[uid] = next(self._turns)
        if len(self._served) > MAX_SERVED:  # forget the uids served longest ago
            for old in sorted(self._served, key=self._served.__getitem__)[: MAX_SERVED // 2]:
                del self._served[old]
        return job

    def _run(self) -> None:
        collect_at = time.monotonic() + COLLECT_EVERY
        while True:
            with self._ready:
                if self._stopping:
                    return
                job = self._next()
            if job is None:
                self._idle()
            else:
                self._apply(job)
            with self._ready:
                busy = set(self._busy)
            try:
                self._sessions.expire(busy)
            except Exception:  # our bug: the worker must go on, or no rule changes any more
                log.exception("expiring sessions failed")
            if job is None and time.monotonic() >= collect_at:
                gc.collect()
                collect_at = time.monotonic() + COLLECT_EVERY

    def _idle(self) -> None:
        """Wait for a job, an opener's exit, or the next look at the leases. Nothing is busy
        while the worker waits, so an exit readable here is expired at once and the wait
        does not spin."""
        select.select([self._kicked.fileno(), self._sessions.exits.fileno()], [], [], EXPIRE_EVERY)
        _drain(self._kicked)

    def _apply(self, job: Job) -> None:
        try:
            reply = self._work(job.uid, job.payload, job.pid)  # never raises
        finally:
            with self._ready:
                self._pending[job.uid] -= 1
                if self._pending[job.uid] <= 0:
                    del self._pending[job.uid]
                if job.session is not None:
                    self._busy[job.session] -= 1
                    if self._busy[job.session] <= 0:
                        del self._busy[job.session]
        self._answers.append((job.identity, reply))
        _poke(self._wake)


def _poke(end: socket.socket) -> None:
    """One byte to wake the other end; a full buffer has woken it already."""
    try:
        end.send(b"\0")
    except BlockingIOError:
        pass


def _drain(end: socket.socket) -> None:
    """Read every wake-up byte there is."""
    try:
        while end.recv(4096):
            pass
    except BlockingIOError:
        pass

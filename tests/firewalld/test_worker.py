"""The worker thread: requests taken from each uid in turn, bounded queues answered busy, and
no lease run out while the session's own request waits; with a work function of the test's
that holds each request until the test lets it go."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from shuttle_firewalld.sessions import Sessions
from shuttle_firewalld.worker import MAX_PENDING, MAX_PENDING_PER_UID, Job, Worker

from .daemon import wait_until
from .fakes import FakeClock, open_request


class Held:
    """A work function: records each (uid, payload), answers it once the test says go."""

    def __init__(self) -> None:
        self.started: list[bytes] = []
        self.go = threading.Semaphore(0)

    def __call__(self, uid: int, payload: bytes, pid: int | None) -> bytes:
        self.started.append(payload)
        if not self.go.acquire(timeout=10):
            raise AssertionError("the test never let the request go")
        return b"answer to " + payload


@pytest.fixture
def held() -> Held:
    return Held()


@pytest.fixture
def worker(sessions: Sessions, held: Held) -> Iterator[Worker]:
    worker = Worker(sessions, held)
    worker.start()
    try:
        yield worker
    finally:
        for _ in range(MAX_PENDING + 1):
            held.go.release()
        worker.stop()


def answers(worker: Worker, count: int) -> list[tuple[bytes, bytes]]:
    """The next count answers the worker makes."""
    got: list[tuple[bytes, bytes]] = []

    def enough() -> bool:
        got.extend(worker.answers())
        return len(got) >= count

    assert wait_until(enough)
    return got


def job(uid: int, name: str, session: str | None = None) -> Job:
    return Job(name.encode(), uid, name.encode(), session)


def test_uids_take_turns_and_each_answer_goes_to_its_connection(worker: Worker, held: Held) -> None:
    for submitted in (job(1000, "a1"), job(1000, "a2"), job(1001, "b1")):
        assert worker.submit(submitted) is None
    assert wait_until(lambda: held.started == [b"a1"])
    for _ in range(3):
        held.go.release()
    assert answers(worker, 3) == [
        (b"a1", b"answer to a1"),
        (b"b1", b"answer to b1"),  # before a2: uid 1001's turn came first
        (b"a2", b"answer to a2"),
    ]


def test_a_uid_just_served_waits_behind_one_that_was_not(worker: Worker, held: Held) -> None:
    """uid 1000's queue runs empty when its first request is taken; its next one still
    waits behind uid 1001's, which came later."""
    assert worker.submit(job(1000, "a1")) is None
    assert wait_until(lambda: held.started == [b"a1"])
    for submitted in (job(1000, "a2"), job(1001, "b1")):
        assert worker.submit(submitted) is None
    for _ in range(3):
        held.go.release()
    assert [name for name, _ in answers(worker, 3)] == [b"a1", b"b1", b"a2"]


def test_too_many_requests_are_answered_busy_at_once(worker: Worker, held: Held) -> None:
    for number in range(MAX_PENDING_PER_UID):
        assert worker.full(1000) is None
        assert worker.submit(job(1000, f"a{number}")) is None
    assert worker.full(1000) == worker.submit(job(1000, "more"))  # asked before a frame's copy
    assert worker.submit(job(1000, "more")) == (
        f"busy: uid 1000 has {MAX_PENDING_PER_UID} requests waiting or being applied; send "
        "this one again once one is answered"
    )
    for uid in range(2000, 2000 + (MAX_PENDING - MAX_PENDING_PER_UID)):
        assert worker.submit(job(uid, f"u{uid}")) is None
    assert (
        worker.full(3000)
        == worker.submit(job(3000, "late"))
        == (f"busy: {MAX_PENDING} requests wait already; send this one again soon")
    )
    held.go.release()  # one answered: uid 1000 has room again
    assert answers(worker, 1) == [(b"a0", b"answer to a0")]
    assert worker.submit(job(1000, "again")) is None


def test_no_lease_runs_out_while_the_sessions_request_waits(
    sessions: Sessions, clock: FakeClock, worker: Worker, held: Held
) -> None:
    session = sessions.open(1000, open_request())
    assert worker.submit(job(1001, "first")) is None
    assert worker.submit(job(1000, "update", session.id)) is None
    assert wait_until(lambda: held.started == [b"first"])
    clock.now = session.deadline + 1  # its lease is over while its request waits
    held.go.release()
    assert wait_until(lambda: held.started == [b"first", b"update"])
    assert len(sessions) == 1  # the worker expired sessions in between, and kept this one
    held.go.release()
    # Its request answered without renewing it (the test's work function does not): now
    # the lease counts again.
    assert wait_until(lambda: len(sessions) == 0)

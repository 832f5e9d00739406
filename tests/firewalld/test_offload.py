"""The child that checks a long OpenSession or UpdateSession: the real one, as the caller,
confined, and what the daemon makes of its answers; then stand-in children that overrun,
say too much, crash or lie, each a refused request and never more."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from shuttle_firewalld import offload
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.prepared import Prepared, nft_elements
from shuttle_firewalld.server import QUICK_FRAME, answer
from shuttle_firewalld.sessions import Sessions
from shuttle_firewalld.targets import Target
from shuttle_protocol.firewall_messages import (
    ErrorAnswer,
    ListSessionsRequest,
    OpenSessionAnswer,
    OpenSessionRequest,
    SetHostsRequest,
    UpdateSessionAnswer,
    UpdateSessionRequest,
)
from shuttle_protocol.frames import decode_frame, encode_frame

from .fakes import FakeMethod, open_request

MEMBER = 65533
# 4,000 /32 subnets on a port range: a frame well over QUICK_FRAME.
SUBNETS = tuple((f"10.0.{i // 250}.{i % 250}/32", 80, 90) for i in range(4000))
EXCLUDES = (("10.0.0.7/32", 85, 85),)


def long_update(session: str, request_id: int = 9) -> bytes:
    frame = encode_frame(request_id, UpdateSessionRequest(session, SUBNETS, EXCLUDES))
    assert len(frame) > QUICK_FRAME
    return frame


def test_the_child_prepares_a_long_update_for_the_method() -> None:
    ready = offload.prepare(long_update("a" * 32), "nft", MEMBER)
    request_id, request = ready.request(UpdateSessionRequest)
    assert request_id == 9
    assert request == UpdateSessionRequest("a" * 32, SUBNETS[:1], ())
    assert (len(ready.subnets), len(ready.excludes)) == (4000, 1)
    targets = tuple(map(Target.from_wire, SUBNETS))
    assert nft_elements(ready.subnets, 4) == nft_elements(targets, 4)


@pytest.mark.parametrize(
    ("payload", "refusal"),
    [
        (long_update("a" * 32)[:-3], "bad request: a frame holds one value, this one 0"),
        (b"\x00" * (5 * 1024 * 1024), "bad request: a request is at most"),
        (encode_frame(3, ListSessionsRequest()), "ListSessionsRequest is not prepared here"),
        # A thousand port ranges on 4,000 address segments: more work than nft's sets may be.
        (
            encode_frame(
                4,
                UpdateSessionRequest(
                    "a" * 32,
                    (
                        *(("10.0.0.0/8", port, port) for port in range(1, 1001)),
                        *(
                            (f"10.0.{i // 250}.{i % 250}/32", 2000 + i, 2000 + i)
                            for i in range(2000)
                        ),
                    ),
                    (),
                ),
            ),
            "the subnets overlap in too many ways",
        ),
    ],
)
def test_the_childs_refusals(payload: bytes, refusal: str) -> None:
    with pytest.raises(RequestError, match=refusal):
        offload.prepare(payload, "nft", MEMBER)


def test_the_child_reads_the_request_as_the_caller_and_confined(tmp_path: Path) -> None:
    # A FIFO that nobody writes holds the child where it reads the request: confined by then.
    fifo = tmp_path / "request"
    os.mkfifo(fifo)
    child = subprocess.Popen([*offload.CHILD, "nft", str(MEMBER)], stdin=os.open(fifo, os.O_RDWR))
    try:
        status = Path(f"/proc/{child.pid}/status")
        for _ in range(100):  # its imports take a moment; 10 s at most
            if f"Uid:\t{MEMBER}\t" in status.read_text():
                break
            time.sleep(0.1)
        lines = dict(line.split(":", 1) for line in status.read_text().splitlines())
        assert lines["Uid"].split() == [str(MEMBER)] * 4
        assert lines["Gid"].split() == [str(offload.NOBODY_GROUP)] * 4
        assert lines["Groups"].split() == []
        # Undumpable: its /proc files are root's, not the caller's.
        assert status.stat().st_uid == 0
        limits = Path(f"/proc/{child.pid}/limits").read_text()
        assert f"Max address space         {offload.CHILD_MEMORY}" in limits
        assert "Max file size             0" in limits
        nice = int(Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
        assert nice == offload.NICE
    finally:
        child.kill()
        child.wait()


def test_a_long_request_is_applied_with_what_the_child_prepared(
    sessions: Sessions, method: FakeMethod
) -> None:
    _, opened = decode_frame(answer(sessions, 1000, encode_frame(1, open_request(method="nft"))))
    assert isinstance(opened, OpenSessionAnswer)
    request_id, reply = decode_frame(answer(sessions, 1000, long_update(opened.session)))
    assert (request_id, reply) == (9, UpdateSessionAnswer(4001))
    _, subnets, excludes = method.updated[-1]
    assert isinstance(subnets, Prepared) and isinstance(excludes, Prepared)
    assert (len(subnets), len(excludes)) == (4000, 1)
    # Another's session, or none: the same answer as to a short request, after the check.
    for uid, session in ((1001, opened.session), (1000, "b" * 32)):
        assert decode_frame(answer(sessions, uid, long_update(session))) == (
            9,
            ErrorAnswer("no such session"),
        )
    _, refused = decode_frame(answer(sessions, 1000, long_update(opened.session)[:-3]))
    assert isinstance(refused, ErrorAnswer) and refused.text.startswith("bad request: ")
    assert len(method.updated) == 1


def stand_in(monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Run this Python instead of the real child (METHOD and UID follow on its argv)."""
    monkeypatch.setattr(offload, "CHILD", (sys.executable, "-c", script))


def says(value: object) -> str:
    data = msgpack.packb(value, use_bin_type=True)
    return f"import sys; sys.stdout.buffer.write(bytes.fromhex({data.hex()!r}))"


GOOD: tuple[object, ...] = (1, (4,), {4: "\t\t\t10.0.0.0/8 . 1-65535"}, {}, {})
FRAME = encode_frame(1, UpdateSessionRequest("a" * 32, SUBNETS[:1], ()))


@pytest.mark.parametrize(
    ("script", "refusal"),
    [
        ("import time; time.sleep(30)", "took longer than 0.5 s"),
        # What its caller (its uid) may do to it: each ends the check at once.
        ("import os, signal; os.kill(os.getpid(), signal.SIGSTOP)", "was stopped by its caller"),
        ("import os, time; os.nice(10); time.sleep(30)", "was slowed down by its caller"),
        (
            "import os, time; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)); "
            "time.sleep(30)",
            "was slowed down by its caller",
        ),
        ("import sys; sys.stdout.buffer.write(b'x' * 5000)", "longer than 4096 bytes"),
        ("raise SystemExit(3)", r"failed \(exit 3\)"),
        ("import os; os.kill(os.getpid(), 9)", r"failed \(exit -9\)"),
        ("print('hello')", "said something else"),
        (says(["ready", FRAME, GOOD]), "said something else"),
        (says(["refused", 7]), "said something else"),
        # The rule text of a subverted child: an element that ends the set, and more.
        (
            says(["ready", FRAME, GOOD, (1, (4,), {4: "1.2.3.4 . 1 }\n}\nflush ruleset"}, {}, {})]),
            "said something else",
        ),
        (
            says(["ready", FRAME, GOOD, (1, (4,), {}, {4: "-d 0/0 -j ACCEPT"}, {})]),
            "said something else",
        ),
        (says(["ready", FRAME, GOOD, (1, (4,), {}, {}, {4: b"\x00" * 11})]), "said something else"),
        (says(["ready", FRAME, GOOD, (10**6, (4,), {}, {}, {})]), "said something else"),
        (says(["ready", FRAME, GOOD, (1, (5,), {}, {}, {})]), "said something else"),
        (says(["ready", FRAME, GOOD, (1, (4,), {6: "::/0 . 1"}, {}, {})]), "said something else"),
        (says(["refused", "no, thanks"]), "no, thanks"),
    ],
)
def test_a_child_that_fails_or_lies_refuses_the_request(
    monkeypatch: pytest.MonkeyPatch, script: str, refusal: str
) -> None:
    # Long enough for the stand-in's start under load, and each meddling is seen before.
    monkeypatch.setattr(offload, "BUDGET", 5.0 if "caller" in refusal else 0.5)
    monkeypatch.setattr(offload, "MAX_OUTPUT", 4096)
    stand_in(monkeypatch, script)
    with pytest.raises(RequestError, match=refusal):
        offload.prepare(FRAME, "nft", MEMBER)


def test_the_daemon_checks_the_stand_in_too(
    monkeypatch: pytest.MonkeyPatch, sessions: Sessions, method: FakeMethod
) -> None:
    _, opened = decode_frame(answer(sessions, 1000, encode_frame(1, open_request(method="nft"))))
    assert isinstance(opened, OpenSessionAnswer)
    payload = long_update(opened.session)
    # A stand-in of another session (the caller's own) or of another request: refused.
    other = encode_frame(9, UpdateSessionRequest("c" * 32, SUBNETS[:1], ()))
    for frame in (other, encode_frame(9, ListSessionsRequest()), b"\xc1"):
        stand_in(monkeypatch, says(["ready", frame, GOOD, GOOD]))
        _, refused = decode_frame(answer(sessions, 1000, payload))
        assert isinstance(refused, ErrorAnswer)
        assert refused.text.startswith("the request's check said something else")
    assert method.updated == []


def test_every_long_open_or_update_is_the_childs_to_decode(
    monkeypatch: pytest.MonkeyPatch, sessions: Sessions
) -> None:
    stand_in(monkeypatch, says(["refused", "the child's word"]))
    targets = [list(target) for target in SUBNETS]
    frames = [
        long_update("a" * 32),
        pack([9, UpdateSessionRequest.TAG, "x" * 33, targets, []]),  # no session id
        pack([9, UpdateSessionRequest.TAG, None, targets, []]),
        encode_frame(9, open_request(method="auto", subnets=tuple(s for s, _, _ in SUBNETS))),
        pack([9, OpenSessionRequest.TAG, 7, 12300, targets, [], 1000, -1, False, []]),
    ]
    for frame in frames:
        assert len(frame) > QUICK_FRAME
        assert decode_frame(answer(sessions, 1000, frame)) == (9, ErrorAnswer("the child's word"))
    # Any other long frame is decoded here, as before.
    hosts = pack([9, SetHostsRequest.TAG, "a" * 32, [["h" * 60, "10.0.0.1"]] * 2000])
    assert len(hosts) > QUICK_FRAME
    assert decode_frame(answer(sessions, 1000, hosts)) == (9, ErrorAnswer("no such session"))


def pack(value: object) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data

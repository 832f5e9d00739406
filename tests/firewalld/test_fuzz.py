"""Fuzzing the real shuttle-firewalld over its real zmq socket, as root and as another uid.

Hypothesis draws batches of frames: random bytes, well-formed arrays under any tag with
wrong fields, valid requests (some naming the sessions opened so far, some another uid's)
with one field mutated or not at all, huge counts and lengths, deep nesting. Each frame is
checked against what decode_frame says of it here: a frame that does not decode gets
"bad request: ..." under the id request_id_of finds; one that does gets its paired answer or
an ErrorAnswer; nobody reaches another uid's session. The sessions that valid requests
opened are tracked, and afterwards the firewall holds exactly their tables and chains; once
they are closed, the ruleset, the policy routing, the hosts file, the socket directory and
/etc/shuttle are as they were. The daemon still serves, logged no traceback, and its
resident memory stayed under MAX_RSS. (test_server.py has the fixed list of bad frames
and the in-process property tests of answer(); this is the real daemon's side.)
"""

from __future__ import annotations

import difflib
import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shuttle_protocol.errors import RemoteProtocolError
from shuttle_protocol.firewall_messages import (
    ANY_OWNER,
    BYPASS_KINDS,
    PAIRS,
    BypassSocketRequest,
    CloseSessionAnswer,
    CloseSessionRequest,
    ErrorAnswer,
    HeartbeatAnswer,
    HeartbeatRequest,
    ListSessionsAnswer,
    ListSessionsRequest,
    OpenSessionAnswer,
    OpenSessionRequest,
    ReplySocketRequest,
    SetHostsAnswer,
    SetHostsRequest,
    UpdateSessionRequest,
)
from shuttle_protocol.frames import MAX_FRAME, decode_frame, encode_frame
from shuttle_protocol.rpc import request_id_of
from shuttle_protocol.schema import FRAME_TAGS, REGISTRY, Message

from .daemon import NOBODY, WAIT, Daemon, Listener, nft, shuttle_rules, shuttle_tables
from .fakes import wire_values

pytestmark = pytest.mark.integration

ROOT, NOBODY_UID = 0, 65534
ROOT_PORT, NOBODY_PORT = 12300, 12301  # where each caller listens, on 127.0.0.1 and ::1
# The daemon's resident set, a Python process with a few sessions, is about 30 MiB; frames
# of up to 4 MiB decode into objects several times that, once at a time. A leak of what
# hundreds of frames carried would go far past this.
MAX_RSS = 160 * 1024 * 1024
LEASE = 600  # no session expires during the run: what is open is what valid requests opened
HOSTS = b"127.0.0.1 localhost\n10.9.9.9 admin.example # the admin's own\n"

# What each request is answered with when it is served.
ANSWERS = PAIRS.answers
FRAME_MESSAGE_TAGS = sorted(tag for tag in REGISTRY if tag in FRAME_TAGS)

# A long-lived DEALER of another uid: length-prefixed messages in on stdin (a count of
# parts, then each part), the answer out on stdout (or 0xFFFFFFFF for none in time).
PEER = """\
import struct, sys, zmq
path, timeout_ms = sys.argv[1], int(sys.argv[2])
context = zmq.Context()
dealer = context.socket(zmq.DEALER)
dealer.linger = 0
dealer.connect("ipc://" + path)
stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
def read(n):
    data = stdin.read(n)
    if len(data) < n:
        sys.exit(0)
    return data
while True:
    (count,) = struct.unpack(">I", read(4))
    parts = [read(struct.unpack(">I", read(4))[0]) for _ in range(count)]
    dealer.send_multipart(parts)
    if dealer.poll(timeout_ms):
        reply = dealer.recv()
        stdout.write(struct.pack(">I", len(reply)) + reply)
    else:
        stdout.write(struct.pack(">I", 0xFFFFFFFF))
    stdout.flush()
"""
NO_ANSWER = 0xFFFFFFFF


class RootCaller:
    """A DEALER of this process's (root's), kept for the whole run."""

    uid = ROOT

    def __init__(self, path: Path) -> None:
        self._context = zmq.Context()
        self._dealer = self._context.socket(zmq.DEALER)
        self._dealer.linger = 0
        self._dealer.connect(f"ipc://{path}")

    def ask(self, parts: list[bytes]) -> bytes | None:
        self._dealer.send_multipart(parts)
        if not self._dealer.poll(int(WAIT * 1000)):
            return None
        reply: bytes = self._dealer.recv()
        return reply

    def close(self) -> None:
        self._dealer.close()
        self._context.term()


class NobodyCaller:
    """The PEER script run as uid 65534, in the daemon's group: another uid's requests."""

    uid = NOBODY_UID

    def __init__(self, path: Path) -> None:
        argv = [sys.executable, "-c", PEER, str(path), str(int(WAIT * 1000))]
        self.proc = subprocess.Popen(
            [*NOBODY, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    def _read(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        data = b""
        while len(data) < n:
            if not select.select([self.proc.stdout], [], [], WAIT + 5)[0]:
                raise AssertionError("the other uid's caller is stuck")
            chunk = os.read(self.proc.stdout.fileno(), n - len(data))
            if not chunk:
                raise AssertionError("the other uid's caller ended")
            data += chunk
        return data

    def ask(self, parts: list[bytes]) -> bytes | None:
        assert self.proc.stdin is not None
        message = struct.pack(">I", len(parts))
        message += b"".join(struct.pack(">I", len(part)) + part for part in parts)
        self.proc.stdin.write(message)
        self.proc.stdin.flush()
        (size,) = struct.unpack(">I", self._read(4))
        return None if size == NO_ANSWER else self._read(size)

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(WAIT)
        self.proc.stdout.close()


Caller = RootCaller | NobodyCaller


@dataclass
class Tracked:
    """What the answers said: the sessions open (id → (owner, method)), whether a SetHosts
    went through, how many frames were answered."""

    sessions: dict[str, tuple[int, str]] = field(default_factory=dict)
    hosts_written: bool = False
    frames: int = 0
    served: dict[str, int] = field(default_factory=dict)  # answers other than ErrorAnswer


# -- what the fuzzer sends ----------------------------------------------------------------


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


SUBNETS = [
    ["10.0.0.0/8", 1, 65535],
    ["192.0.2.0/24", 80, 90],
    ["fd00:5e::/32", 443, 443],
    ["198.18.0.7/32", 1, 65535],
]
NAMES = [["db1", "10.2.0.7"], ["web.corp.example", "fd00:5e::80"], ["admin.example", "10.1.1.1"]]
ids = st.integers(0, 2**63 - 1)
small_lists = st.lists(st.sampled_from(SUBNETS), min_size=1, max_size=3)


def pick(data: st.DataObject, known: list[str]) -> str:
    """One of the sessions opened so far, or a made-up id. The draw is the same whatever
    is open, so that hypothesis sees the same choices make the same frame's shape."""
    index = data.draw(st.integers(0, 31))
    return known[index % len(known)] if known else "0" * 32


# What follows the session id in the requests that name one (nothing in Heartbeat,
# CloseSession and Sockets).
AFTER_SESSION: dict[type[Message], st.SearchStrategy[tuple[Any, ...]]] = {
    UpdateSessionRequest: st.tuples(small_lists, st.lists(st.sampled_from(SUBNETS))),
    SetHostsRequest: st.tuples(st.lists(st.sampled_from(NAMES), max_size=3)),
    ReplySocketRequest: st.tuples(
        st.sampled_from(["10.2.0.7", "fd00:5e::1", "127.0.0.1"]), st.just(53)
    ),
    BypassSocketRequest: st.tuples(st.sampled_from(BYPASS_KINDS)),
}


def valid_fields(data: st.DataObject, cls: type[Message], uid: int, known: list[str]) -> list[Any]:
    """Fields of a request that decodes, mostly one that uid's own session would be served
    (its own port and traffic), naming a known session (or a made-up one)."""
    session = pick(data, known)
    port = ROOT_PORT if uid == ROOT else NOBODY_PORT
    if cls is OpenSessionRequest:
        return [
            data.draw(st.sampled_from(["nft", "nat", "auto", "tproxy"])),
            data.draw(st.sampled_from([port, port, port, ROOT_PORT + NOBODY_PORT - port, 1])),
            data.draw(small_lists),
            data.draw(st.lists(st.sampled_from(SUBNETS), max_size=2)),
            data.draw(st.sampled_from([uid, uid, ANY_OWNER, 1000])),
            data.draw(st.sampled_from([ANY_OWNER, 0, 65534])),
            data.draw(st.sampled_from([False, False, True])),
            data.draw(st.sampled_from([[], [], ["10.53.0.53"], ["127.0.0.53", "fd00:53::53"]])),
        ]
    if cls is ListSessionsRequest:
        return []
    after = AFTER_SESSION.get(cls)
    return [session, *(data.draw(after) if after is not None else ())]


def mutated(data: st.DataObject, fields: list[Any]) -> list[Any]:
    """The fields with one replaced, one dropped, one added, or none changed."""
    how = data.draw(st.sampled_from(["none", "none", "none", "replace", "drop", "add"]))
    if how == "replace" and fields:
        index = data.draw(st.integers(0, len(fields) - 1))
        return [*fields[:index], data.draw(wire_values), *fields[index + 1 :]]
    if how == "drop" and fields:
        return fields[: data.draw(st.integers(0, len(fields) - 1))]
    if how == "add":
        return [*fields, data.draw(wire_values)]
    return fields


def _claimed_items(data: st.DataObject, head: bytes, session: str) -> bytes:
    """An array header that claims more than any frame could hold."""
    count = data.draw(st.sampled_from([2**32 - 1, 100_001, 65_536]))
    return b"\xdd" + struct.pack(">I", count) + head + pack(OpenSessionRequest.TAG)


def _claimed_length(data: st.DataObject, head: bytes, session: str) -> bytes:
    """A string or bin that claims four gigabytes."""
    kind = data.draw(st.sampled_from([b"\xdb", b"\xc6"]))
    return b"\x93" + head + pack(HeartbeatRequest.TAG) + kind + b"\xff" * 4 + b"x" * 100


def _most_subnets(data: st.DataObject, head: bytes, session: str) -> bytes:
    """The most subnets there may be, or one more; the last field wrong."""
    count = data.draw(st.sampled_from([50_000, 50_001]))
    fields = ["nat", ROOT_PORT, [SUBNETS[0]] * count, [], ROOT, ANY_OWNER, False, ["x"]]
    return b"\x9a" + head + pack(OpenSessionRequest.TAG) + b"".join(map(pack, fields))


def _most_hosts(data: st.DataObject, head: bytes, session: str) -> bytes:
    """Too many host entries, for a real session."""
    count = data.draw(st.sampled_from([10_001, 99_999]))
    return b"\x94" + head + pack(SetHostsRequest.TAG) + pack(session) + pack([NAMES[0]] * count)


def _deep(data: st.DataObject, head: bytes, session: str) -> bytes:
    """Nesting deeper than any message."""
    depth = data.draw(st.sampled_from([100, 10_000, 100_000]))
    return b"\x92" + head + b"\x91" * depth + b"\xc0"


def _wide(data: st.DataObject, head: bytes, session: str) -> bytes:
    """An array of more items than a frame may have."""
    return b"\xdd" + struct.pack(">I", 100_001) + b"\xc0" * 100_001


def _longest(data: st.DataObject, head: bytes, session: str) -> bytes:
    """A frame at the size limit: one long string."""
    return b"\x93" + head + pack(ErrorAnswer.TAG) + pack("x" * (MAX_FRAME - 64))


def _nested_junk(data: st.DataObject, head: bytes, session: str) -> bytes:
    """Excludes of nested junk, many of them."""
    count = data.draw(st.sampled_from([1000, 50_000]))
    fields = [session, [SUBNETS[0]], [[[[1]]]] * count]
    return b"\x95" + head + pack(UpdateSessionRequest.TAG) + b"".join(map(pack, fields))


# Frames of huge counts or lengths, within MAX_FRAME (libzmq drops bigger ones).
HUGE = [
    _claimed_items,
    _claimed_length,
    _most_subnets,
    _most_hosts,
    _deep,
    _wide,
    _longest,
    _nested_junk,
]


def draw_frame(data: st.DataObject, uid: int, known: list[str]) -> bytes:
    kind = data.draw(st.sampled_from(["bytes", "fields", "valid", "valid", "valid", "huge"]))
    if kind == "bytes":
        return data.draw(st.binary(max_size=600))
    if kind == "fields":
        tag = data.draw(st.sampled_from([*FRAME_MESSAGE_TAGS, 0, 1, 6, 63, 128, 255, -1, 2**40]))
        return pack([data.draw(ids), tag, *data.draw(st.lists(wire_values, max_size=9))])
    if kind == "huge":
        make = data.draw(st.sampled_from(HUGE))
        return make(data, pack(data.draw(ids)), pick(data, known))
    cls = data.draw(st.sampled_from(list(ANSWERS)))
    fields = mutated(data, valid_fields(data, cls, uid, known))
    return pack([data.draw(ids), cls.TAG, *fields])


# -- checking the answers --------------------------------------------------------------------


def check_answer(caller: Caller, parts: list[bytes], reply: bytes | None, tracked: Tracked) -> None:
    """The answer is the one this frame deserves; the sessions it opens or closes are noted."""
    assert reply is not None, f"no answer to {parts[0][:60]!r}"
    request_id, answer = decode_frame(reply)  # raises if the daemon sent garbage
    tracked.frames += 1
    if len(parts) != 1:
        assert (request_id, answer) == (0, ErrorAnswer(f"a request is one frame, not {len(parts)}"))
        return
    try:
        asked_id, request = decode_frame(parts[0])
    except RemoteProtocolError:
        assert isinstance(answer, ErrorAnswer), answer
        assert answer.text.startswith("bad request: "), answer.text
        assert request_id == request_id_of(parts[0])
        return
    assert request_id == asked_id
    served = ANSWERS.get(type(request))
    if isinstance(answer, ErrorAnswer):
        assert not answer.text.startswith("internal error"), answer.text
        return
    assert served is not None and isinstance(answer, served), (request, answer)
    tracked.served[type(answer).__name__] = tracked.served.get(type(answer).__name__, 0) + 1
    session = getattr(request, "session", None)
    if session is not None:  # only the owner is ever served
        assert tracked.sessions[session][0] == caller.uid, (request, answer)
    if isinstance(answer, OpenSessionAnswer):
        tracked.sessions[answer.session] = (caller.uid, answer.method)
    elif isinstance(answer, CloseSessionAnswer):
        del tracked.sessions[session]  # type: ignore[arg-type]
    elif isinstance(answer, SetHostsAnswer):
        tracked.hosts_written = True
    elif isinstance(answer, ListSessionsAnswer):
        mine = {s[:12] for s, (owner, _) in tracked.sessions.items() if caller.uid in (owner, ROOT)}
        assert {entry.session for entry in answer.sessions} == mine


# -- the state of the namespace and the files --------------------------------------------------


def in_netns(netns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def firewall_state(netns: str) -> dict[str, Any]:
    """Everything a session could leave behind: rules of every table, policy routing."""
    return {
        "nft": nft(netns, "list", "ruleset"),
        "iptables": [
            line
            for tool in ("iptables-save", "ip6tables-save")
            for line in in_netns(netns, tool).splitlines()
            if not line.startswith("#")
        ],
        "routing": [
            in_netns(netns, "ip", *version, what, "show", *table)
            for version in ((), ("-6",))
            for what, table in (("rule", ()), ("route", ("table", "all")))
        ],
    }


def lines(state: str | list[str]) -> list[str]:
    return state.splitlines() if isinstance(state, str) else "\n".join(state).splitlines()


def files_in(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else ["(missing)"]


def rss(pid: int) -> int:
    """Resident set size in bytes, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def expected_names(tracked: Tracked) -> tuple[list[str], list[str]]:
    """(nft tables, nat chains) of the sessions open now."""
    tables = sorted(f"shuttle-{s[:12]}" for s, (_, m) in tracked.sessions.items() if m != "nat")
    chains = sorted(f"SHUTTLE-{s[:12]}" for s, (_, m) in tracked.sessions.items() if m == "nat")
    return tables, chains


def nat_chains(netns: str) -> list[str]:
    return sorted({line.split()[0][1:] for line in shuttle_rules(netns) if line.startswith(":")})


def open_valid(caller: Caller, port: int, tracked: Tracked) -> str:
    """A valid OpenSession and Heartbeat from caller: served, and tracked."""
    request = OpenSessionRequest(
        "nft", port, (("10.0.0.0/8", 1, 65535),), (), caller.uid, ANY_OWNER, False, ()
    )
    parts = [encode_frame(1, request)]
    reply = caller.ask(parts)
    check_answer(caller, parts, reply, tracked)
    assert reply is not None
    _, answer = decode_frame(reply)
    assert isinstance(answer, OpenSessionAnswer), answer
    parts = [encode_frame(2, HeartbeatRequest(answer.session))]
    reply = caller.ask(parts)
    assert reply is not None and decode_frame(reply) == (2, HeartbeatAnswer())
    return answer.session


def close_all(by_uid: dict[int, Caller], tracked: Tracked) -> None:
    """Every tracked session closed by its owner, and no longer tracked."""
    for number, (session, (owner, _)) in enumerate(list(tracked.sessions.items())):
        parts = [encode_frame(number + 10, CloseSessionRequest(session))]
        reply = by_uid[owner].ask(parts)
        assert reply is not None and decode_frame(reply) == (number + 10, CloseSessionAnswer())
        del tracked.sessions[session]


@pytest.fixture
def callers(
    start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener], socket_dir: Path
) -> Iterator[tuple[Daemon, list[Caller]]]:
    """A real firewalld (group nogroup, so uid 65534 may connect), each caller's listener,
    and both callers; the hosts file exists with the admin's lines."""
    (socket_dir / "hosts").write_bytes(HOSTS)
    daemon = start_firewalld(group="nogroup", lease=LEASE)
    loopbacks = ("127.0.0.1", "::1")
    listen(ROOT_PORT, addresses=loopbacks)
    listen(NOBODY_PORT, as_nobody=True, addresses=loopbacks)
    made: list[Caller] = []
    try:
        made.append(RootCaller(daemon.socket_path))
        made.append(NobodyCaller(daemon.socket_path))
        yield daemon, made
    finally:
        for caller in made:
            caller.close()


def run_fuzz(
    netns: str,
    socket_dir: Path,
    started: tuple[Daemon, list[Caller]],
    examples: int,
    seconds: float,
) -> None:
    daemon, callers = started
    pid = daemon.proc.pid
    assert "shuttle-firewalld" in Path(f"/proc/{pid}/cmdline").read_text()  # ip netns exec execs
    # iptables makes its nat table and built-in chains at first use and leaves them (empty)
    # when the rules go: what any valid session leaves. One of each kind first, then.
    root = callers[0]
    for method in ("nat", "nft", "tproxy"):
        subnets = (("10.0.0.0/8", 1, 65535), ("fd00:5e::/32", 443, 443))
        request = OpenSessionRequest(method, ROOT_PORT, subnets, (), ROOT, ANY_OWNER, False, ())
        reply = root.ask([encode_frame(1, request)])
        assert reply is not None
        _, opened = decode_frame(reply)
        assert isinstance(opened, OpenSessionAnswer), opened
        reply = root.ask([encode_frame(2, CloseSessionRequest(opened.session))])
        assert reply is not None and decode_frame(reply) == (2, CloseSessionAnswer())
    before = firewall_state(netns)
    before_files = (files_in(socket_dir), files_in(Path("/etc/shuttle")))
    tracked = Tracked()
    started_rss = rss(pid)
    peak = [started_rss]
    deadline = time.monotonic() + seconds

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def batch(data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(1, 8))):
            caller = data.draw(st.sampled_from(callers))
            frame = draw_frame(data, caller.uid, list(tracked.sessions))
            parts = [frame]
            if data.draw(st.integers(0, 15)) == 0:  # now and then, several frames at once
                parts += data.draw(st.lists(st.binary(max_size=40), min_size=1, max_size=2))
            if time.monotonic() > deadline:
                continue  # the wall-clock bound: drawn as before, not sent
            check_answer(caller, parts, caller.ask(parts), tracked)
        peak[0] = max(peak[0], rss(pid))

    batch()
    print(f"{tracked.frames} frames answered; served: {tracked.served}; peak RSS {peak[0]}")
    assert tracked.frames > 0
    assert daemon.proc.poll() is None
    assert peak[0] < MAX_RSS, f"firewalld grew from {started_rss} to {peak[0]} bytes"
    # What the firewall holds is exactly what valid requests opened.
    tables, chains = expected_names(tracked)
    assert sorted(shuttle_tables(netns)) == tables
    assert nat_chains(netns) == chains
    if not tracked.hosts_written:
        assert (socket_dir / "hosts").read_bytes() == HOSTS
    # Nobody reaches another uid's session, whatever the request.
    by_uid = {caller.uid: caller for caller in callers}
    for session, (owner, _) in tracked.sessions.items():
        other = by_uid[ROOT if owner == NOBODY_UID else NOBODY_UID]
        others: tuple[Message, ...] = (
            HeartbeatRequest(session),
            SetHostsRequest(session, (("db1", "10.2.0.7"),)),
            UpdateSessionRequest(session, (("10.0.0.0/8", 1, 65535),), ()),
            CloseSessionRequest(session),
        )
        for attempt in others:
            reply = other.ask([encode_frame(3, attempt)])
            assert reply is not None and decode_frame(reply) == (3, ErrorAnswer("no such session"))
    # Each is closed by its owner; the daemon serves valid requests of both callers still.
    close_all(by_uid, tracked)
    for caller, port in zip(callers, (ROOT_PORT, NOBODY_PORT)):
        open_valid(caller, port, tracked)
    close_all(by_uid, tracked)
    # Then nothing of any session is left.
    after = firewall_state(netns)
    for key, was in before.items():
        assert after[key] == was, f"{key} changed:\n" + "\n".join(
            difflib.unified_diff(lines(was), lines(after[key]), lineterm="")
        )
    assert (socket_dir / "hosts").read_bytes() == HOSTS
    assert (files_in(socket_dir), files_in(Path("/etc/shuttle"))) == before_files
    assert "Traceback" not in daemon.log
    # Each refusal is one line that names the caller.
    assert all(f"bad request from uid {caller.uid}: " in daemon.log for caller in callers)
    assert daemon.proc.poll() is None


@pytest.mark.parametrize(
    ("examples", "seconds"),
    [(200, 20.0), pytest.param(3000, 600.0, marks=pytest.mark.slow)],
    ids=["quick", "long"],
)
def test_hostile_frames_leave_nothing_behind_and_firewalld_serves_on(
    netns: str,
    socket_dir: Path,
    callers: tuple[Daemon, list[Caller]],
    examples: int,
    seconds: float,
) -> None:
    run_fuzz(netns, socket_dir, callers, examples, seconds)

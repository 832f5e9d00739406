"""The loop's answers: whatever bytes come in, an answer goes out and serving goes on.

First answer() on its own (unit and property tests), then the real daemon over its socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import stat
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shuttle_client.firewall_session import FirewallSession
from shuttle_firewalld.server import HEAD, QUICK_FRAME, answer, decode_in_pieces, head, peek
from shuttle_firewalld.sessions import Sessions
from shuttle_protocol.errors import RemoteProtocolError
from shuttle_protocol.firewall_messages import (
    CloseSessionAnswer,
    CloseSessionRequest,
    ErrorAnswer,
    ListSessionsAnswer,
    ListSessionsRequest,
    OpenSessionAnswer,
    UpdateSessionRequest,
)
from shuttle_protocol.frames import MAX_FRAME, decode_frame, encode_frame
from shuttle_protocol.rpc import request_id_of
from shuttle_protocol.schema import Message

from .daemon import Daemon, Listener, ask, nat_rules, shuttle_rules
from .fakes import FakeMethod, listening, open_request, wire_values
from .traffic import as_nobody

OPEN = open_request(excludes=("10.1.0.0/16",))
ALL = ["10.0.0.0/8", 1, 65535]


def pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def answer_to(sessions: Sessions, payload: bytes, uid: int = 1000) -> tuple[int, Message]:
    return decode_frame(answer(sessions, uid, payload))


def test_a_request_is_answered_under_its_id(sessions: Sessions) -> None:
    request_id, reply = answer_to(sessions, encode_frame(41, OPEN))
    assert request_id == 41
    assert isinstance(reply, OpenSessionAnswer)
    request_id, reply = answer_to(sessions, encode_frame(42, CloseSessionRequest(reply.session)))
    assert (request_id, reply) == (42, CloseSessionAnswer())


def test_a_refusal_is_answered_under_its_id(sessions: Sessions) -> None:
    assert answer_to(sessions, encode_frame(7, CloseSessionRequest("a" * 32))) == (
        7,
        ErrorAnswer("no such session"),
    )


# Bad frames, each with the request id the answer must carry.
BAD_FRAMES = [
    (b"", 0),
    (b"\xc1", 0),  # a byte msgpack never uses
    (pack([5]), 5),  # an id and nothing else
    (pack([6, 9999]), 6),  # unknown tag
    (pack([7, 64, "nat", "80", [ALL], [], 0, -1, False]), 7),  # port as text
    (pack([8, 64, "ebpf", 80, [ALL], [], 0, -1, False]), 8),  # a method nobody has
    (pack([9, 64, "nat", 80, [["10.0.0.1/8", 1, 65535]], [], 0, -1, False]), 9),  # host bits
    (pack([10, 64, "nat", 80, [], [], 0, -1, False]), 10),  # no subnet
    (pack([10, 64, "nat", 80, ["10.0.0.0/8"], [], 0, -1, False]), 10),  # the old form
    (pack([10, 64, "nat", 80, [["10.0.0.0/8", 90, 80]], [], 0, -1, False]), 10),  # ports
    (pack([10, 64, "nat", 80, [ALL], [], 0, -1, 0]), 10),  # forward as a number
    (pack([10, 64, "nat", 80, [ALL], [], -2, -1, False]), 10),  # uid
    (pack([10, 64, "nat", 80, [ALL], []]), 10),  # the old field count
    (pack([11, 66, "x" * 33]), 11),  # session id too long
    (pack([12, 66]), 12),  # field missing
    (pack(["12", 66, "a" * 32]), 0),  # id as text
    (pack([-1, 66, "a" * 32]), 0),
    (pack([2**64 - 1, 66, "a" * 32]), 0),
    (pack([True, 66, "a" * 32]), 0),
    (pack({"id": 1}), 0),
    (pack([13, 64]) + pack([14, 64]), 13),  # two values in one frame
    (b"\xdd\xff\xff\xff\xff", 0),  # an array header claiming 4 billion items
    (b"\x91" * 100_000, 0),  # arrays nested 100,000 deep
    (pack([15, 64, "nat", 80, [ALL] * 60_000, [], 0, -1, False]), 15),  # too many subnets
    (pack([16, 77, 0]), 16),  # ListSessions for uid 0: the kernel says whose
    (pack([16, 77, "a" * 32]), 16),
    (pack([17, 79, "a" * 32, [], []]), 17),  # UpdateSession without a subnet
    (pack([17, 79, "a" * 32, [ALL]]), 17),  # no excludes
    (pack([17, 79, "a" * 33, [ALL], []]), 17),
    (pack([17, 79, None, [ALL], []]), 17),
    (pack([18, 79, "a" * 32, [["10.0.0.1/8", 1, 65535]], []]), 18),  # host bits
    (pack([18, 79, "a" * 32, [ALL], [["10.0.0.0/8", 0, 65535]]]), 18),  # port 0
    (pack([18, 79, "a" * 32, ["10.0.0.0/8"], []]), 18),  # the old form
    (pack([18, 79, "a" * 32, [ALL] * 60_000, []]), 18),  # too many subnets
    (pack([19, 79, "a" * 32, [ALL], [], 1]), 19),  # a field too many
    (b"\x00" * (MAX_FRAME + 1), 0),
]


@pytest.mark.parametrize(("payload", "request_id"), BAD_FRAMES)
def test_bad_frames_get_an_error_answer(
    sessions: Sessions, method: FakeMethod, payload: bytes, request_id: int
) -> None:
    got_id, reply = answer_to(sessions, payload)
    assert got_id == request_id
    assert isinstance(reply, ErrorAnswer)
    assert reply.text.startswith("bad request: ")
    assert method.applied == []


def test_an_internal_error_is_answered_and_logged(
    sessions: Sessions, method: FakeMethod, caplog: pytest.LogCaptureFixture
) -> None:
    method.fail_apply = KeyError("oops")
    with caplog.at_level(logging.ERROR):
        assert answer_to(sessions, encode_frame(3, OPEN)) == (
            3,
            ErrorAnswer("internal error: KeyError: 'oops'"),
        )
    assert "Traceback" in caplog.text
    assert len(sessions) == 0


def test_an_endless_internal_error_is_cut_to_fit(sessions: Sessions, method: FakeMethod) -> None:
    method.fail_apply = RuntimeError("x" * 10_000)
    _, reply = answer_to(sessions, encode_frame(3, OPEN))
    assert isinstance(reply, ErrorAnswer)
    assert len(reply.text) == 2000


def any_port_sessions() -> Sessions:
    """Sessions where uid 1000 listens on every port, everywhere."""
    return Sessions(
        {"nat": FakeMethod(), "nft": FakeMethod()},
        6.0,
        listeners_of_port=lambda port: listening(port, 1000, "0.0.0.0", "::"),
    )


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=300))
def test_any_bytes_get_a_decodable_answer(payload: bytes) -> None:
    request_id, reply = answer_to(any_port_sessions(), payload)
    assert isinstance(reply, (ErrorAnswer, OpenSessionAnswer))
    assert 0 <= request_id < 2**63


@settings(max_examples=300, deadline=None)
@given(
    request_id=st.integers(min_value=0, max_value=2**63 - 1),
    tag=st.sampled_from([*range(64, 81), 127, 1, 200]),
    fields=st.lists(wire_values, max_size=8),
)
def test_any_fields_under_any_tag_get_an_answer_with_the_id(
    request_id: int, tag: int, fields: list[Any]
) -> None:
    got_id, reply = answer_to(any_port_sessions(), pack([request_id, tag, *fields]))
    assert got_id == request_id
    assert isinstance(reply, (ErrorAnswer, OpenSessionAnswer, ListSessionsAnswer))


def decoded(decode: Callable[[bytes], tuple[int, Message]], payload: bytes) -> object:
    """What decode makes of payload: its result, or that it refused it."""
    try:
        return decode(payload)
    except RemoteProtocolError:
        return "refused"


@settings(max_examples=300, deadline=None)
@given(request_id=st.integers(min_value=0, max_value=2**63 - 1), fields=st.lists(wire_values))
def test_a_long_frame_read_in_pieces_is_read_as_decode_frame_reads_it(
    request_id: int, fields: list[Any]
) -> None:
    for tag in (66, 79):  # HeartbeatRequest, UpdateSessionRequest
        payload = pack([request_id, tag, *fields])
        assert decoded(decode_in_pieces, payload) == decoded(decode_frame, payload)


def test_the_largest_update_is_read_in_pieces_alike() -> None:
    subnets = tuple((f"10.{i // 256}.{i % 256}.0/24", 1, 65535) for i in range(50_000))
    request = UpdateSessionRequest("a" * 32, subnets, subnets[:1])
    payload = encode_frame(5, request)
    assert len(payload) > QUICK_FRAME
    assert decode_in_pieces(payload) == (5, request)
    for bad, _ in BAD_FRAMES:  # and every bad frame is as bad
        assert decoded(decode_in_pieces, bad) == decoded(decode_frame, bad) == "refused"


def test_peek_reads_the_tag_and_session_only() -> None:
    assert peek(encode_frame(5, UpdateSessionRequest("a" * 32, (tuple(ALL),), ()))) == (
        79,
        "a" * 32,
    )
    assert peek(encode_frame(6, ListSessionsRequest())) == (77, None)
    assert peek(encode_frame(7, OPEN)) == (64, "nat")  # a first field, not a session
    assert peek(pack([8, 66, 1234])) == (66, None)
    for payload in (b"", b"\xc1", pack([5]), pack({"id": 1})):
        assert peek(payload) == (None, None)


def test_a_big_frame_is_peeked_and_refused_from_its_head_alone() -> None:
    # msgpack's feed() copies what it is given: the loop copied a whole frame to read its
    # first bytes, for every big request it answered busy and every over-long frame.
    subnets = tuple((f"10.{i // 256}.{i % 256}.0/24", 1, 65535) for i in range(50_000))
    payload = encode_frame(2**63 - 1, UpdateSessionRequest("a" * 32, subnets, ()))
    tracemalloc.start()
    try:
        assert peek(payload) == (79, "a" * 32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(payload) // 10  # the whole frame, copied: 1 MB
    assert len(head(payload)) == HEAD
    assert request_id_of(head(payload)) == 2**63 - 1  # what the refusals are answered under
    # A first field longer than the head is no session id; the tag is read all the same.
    assert peek(pack([3, 66, "b" * HEAD])) == (66, None)


def test_list_sessions_with_no_fields_is_answered(sessions: Sessions) -> None:
    assert answer_to(sessions, pack([4, 77])) == (4, ListSessionsAnswer(()))


# --- real daemon ---------------------------------------------------------------------


@pytest.mark.integration
def test_open_and_close_install_and_remove_exactly_the_sessions_rules(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    daemon = start_firewalld(group="root")
    listen(12300)
    mode = os.stat(daemon.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660
    # The fd socket (tproxy) beside it: the same mode and group.
    fds = os.stat(f"{daemon.socket_path}.fds")
    assert (fds.st_mode, fds.st_uid, fds.st_gid) == (mode, 0, os.stat(daemon.socket_path).st_gid)
    before = nat_rules(netns)
    client = FirewallSession(str(daemon.socket_path))

    async def open_check_close() -> list[str]:
        try:
            await client.open("nat", 12300, ["10.0.0.0/8", "192.0.2.0/24"], ["10.1.0.0/16"])
            return nat_rules(netns)
        finally:
            await client.close()

    during = asyncio.run(open_check_close())
    chain = next(line for line in during if line.startswith(":SHUTTLE-")).split()[0][1:]
    assert [line for line in during if line not in before] == [
        f":{chain} - [0:0]",
        f"-A OUTPUT -p tcp -m owner --uid-owner 0 -j {chain}",
        f"-A {chain} -m addrtype --dst-type LOCAL -j RETURN",
        f"-A {chain} -d 127.0.0.0/8 -j RETURN",
        f"-A {chain} -d 10.1.0.0/16 -j RETURN",
        f"-A {chain} -d 10.0.0.0/8 -p tcp -j REDIRECT --to-ports 12300",
        f"-A {chain} -d 192.0.2.0/24 -p tcp -j REDIRECT --to-ports 12300",
    ]
    assert nat_rules(netns) == before
    assert f"session {chain[8:]} of uid 0 closed by uid 0: 6 nat rules removed" in daemon.log


@pytest.mark.integration
def test_the_callers_uid_is_the_kernels(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    daemon = start_firewalld(group="nogroup")
    listen(12300)  # root's
    listen(12301, as_nobody=True)
    # The uid in the request is whose traffic to capture; the caller's is the one the
    # kernel told ZAP, which the refusal names.
    asked = {"method": "nat", "subnets": ["10.0.0.0/8"], "excludes": [], "uid": 65534}
    assert as_nobody(daemon.socket_path, port=12300, **asked) == (
        "shuttle-firewalld: no listening socket of uid 65534 on port 12300 at 127.0.0.1 or a "
        "wildcard address, where IPv4 connections land"
    )
    assert shuttle_rules(netns) == []
    assert as_nobody(daemon.socket_path, port=12301, **asked) == "opened nat"
    assert re.search(r"opened by uid 65534 \(pid \d+\): nat to port 12301", daemon.log)
    assert shuttle_rules(netns) == []


@pytest.mark.integration
def test_garbage_gets_error_answers_and_serving_goes_on(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    daemon = start_firewalld()
    listen(12300)
    rng = random.Random(1234)
    garbage = [(payload, request_id) for payload, request_id in BAD_FRAMES[:-1]]
    garbage += [(rng.randbytes(rng.randrange(1, 2000)), 0) for _ in range(20)]
    for payload, request_id in garbage:
        got_id, reply = ask(daemon.socket_path, payload)
        assert isinstance(reply, ErrorAnswer), payload[:40]
        assert request_id in (got_id, 0)  # 0: the test does not know, any id will do
    for frames in ([b"a", b"b"], [b"", encode_frame(1, OPEN)]):
        assert ask(daemon.socket_path, *frames) == (0, ErrorAnswer("a request is one frame, not 2"))
    # A frame over the limit: libzmq drops that connection, and the daemon carries on.
    with pytest.raises(AssertionError, match="no answer"):
        ask(daemon.socket_path, b"\x00" * (MAX_FRAME + 1), timeout=2)
    request_id, reply = ask(daemon.socket_path, encode_frame(77, OPEN))
    assert request_id == 77
    assert isinstance(reply, OpenSessionAnswer)
    assert len(shuttle_rules(netns)) == 6
    request_id, reply = ask(daemon.socket_path, encode_frame(78, ListSessionsRequest()))
    assert request_id == 78
    assert isinstance(reply, ListSessionsAnswer)
    assert [entry.rules for entry in reply.sessions] == [5]  # the chain is no rule
    assert daemon.proc.poll() is None

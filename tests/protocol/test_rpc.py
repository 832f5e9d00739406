"""The request/answer core: each set's table of pairs, the caller's numbering and matching,
and the rule for refusing a frame under the request's id."""

from typing import List

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shuttle_protocol import control_messages as cm
from shuttle_protocol import firewall_messages as fw
from shuttle_protocol.errors import LocalProtocolError, RemoteProtocolError
from shuttle_protocol.frames import MAX_REQUEST_ID, decode_frame, encode_frame
from shuttle_protocol.rpc import AnswerError, Caller, Pairs, request_id_of
from shuttle_protocol.schema import REGISTRY, Message

from .strategies import STRATEGIES, frame_messages

SETS = {"firewall": (fw, fw.PAIRS), "control": (cm, cm.PAIRS)}
sets = pytest.mark.parametrize("name", list(SETS))
request_ids = st.integers(0, MAX_REQUEST_ID)


def _classes(module: object, suffix: str) -> List[type]:
    return [
        cls
        for cls in REGISTRY.values()
        if cls.__module__ == module.__name__  # type: ignore[attr-defined]
        and cls.__name__.endswith(suffix)
    ]


@sets
def test_the_table_pairs_each_request_with_its_namesake_answer(name: str) -> None:
    module, pairs = SETS[name]
    assert sorted(pairs.answers, key=lambda c: c.TAG) == sorted(
        _classes(module, "Request"), key=lambda c: c.TAG
    )
    for request, answer in pairs.answers.items():
        assert answer.__name__ == request.__name__.replace("Request", "Answer")
        assert answer.TAG == request.TAG + 1  # pairs sit side by side in the tags too


def test_a_table_refuses_an_error_answer_among_its_pairs() -> None:
    with pytest.raises(LocalProtocolError, match="is the error answer"):
        Pairs({fw.HeartbeatRequest: fw.ErrorAnswer}, fw.ErrorAnswer)
    with pytest.raises(LocalProtocolError, match="no text field"):
        Pairs({fw.HeartbeatRequest: fw.HeartbeatAnswer}, fw.SetHostsAnswer)


@sets
@given(data=st.data(), late=st.lists(request_ids, max_size=5), copies=st.integers(1, 4))
@settings(max_examples=100, deadline=None)
def test_the_answer_to_any_copy_counts_and_others_are_late(
    name: str, data: st.DataObject, late: List[int], copies: int
) -> None:
    _, pairs = SETS[name]
    caller = Caller(pairs)
    kind = data.draw(st.sampled_from(sorted(pairs.answers, key=lambda c: c.TAG)))
    earlier = caller.call(data.draw(STRATEGIES[kind]), pairs.answers[kind])
    earlier.frame()
    request = data.draw(STRATEGIES[kind])
    call = caller.call(request, pairs.answers[kind])
    ids = [decode_frame(call.frame())[0] for _ in range(copies)]
    assert len(set(ids)) == copies and not set(ids) & earlier.sent  # numbered, never twice
    answer = data.draw(STRATEGIES[pairs.answers[kind]])
    for other in late:
        if other not in ids:
            assert call.receive(encode_frame(other, answer)) is None
    assert call.receive(encode_frame(data.draw(st.sampled_from(ids)), answer)) == answer


@sets
@given(data=st.data())
@settings(max_examples=50, deadline=None)
def test_an_error_answer_or_another_type_is_one_exception(name: str, data: st.DataObject) -> None:
    _, pairs = SETS[name]
    kind = data.draw(st.sampled_from(sorted(pairs.answers, key=lambda c: c.TAG)))
    call = Caller(pairs).call(data.draw(STRATEGIES[kind]), pairs.answers[kind])
    request_id = decode_frame(call.frame())[0]
    text = data.draw(st.text(max_size=100))
    with pytest.raises(AnswerError) as refused:
        call.receive(encode_frame(request_id, pairs.error(text)))
    assert refused.value.refused and str(refused.value) == text
    others = frame_messages.filter(lambda m: type(m) not in (pairs.answers[kind], pairs.error))
    other = data.draw(others)
    with pytest.raises(AnswerError) as wrong:
        call.receive(encode_frame(request_id, other))
    assert not wrong.value.refused
    assert str(wrong.value) == f"answered {kind.__name__} with {type(other).__name__}"


@given(data=st.binary(max_size=64))
@settings(max_examples=200, deadline=None)
def test_a_malformed_answer_is_the_same_exception(data: bytes) -> None:
    call = Caller(fw.PAIRS).call(fw.ListSessionsRequest(), fw.ListSessionsAnswer)
    call.frame()
    try:
        decode_frame(data)
    except RemoteProtocolError:  # whatever decode_frame refuses, receive refuses too
        with pytest.raises(AnswerError, match=r"^sent a malformed answer: ") as caught:
            call.receive(data)
        assert not caught.value.refused


def test_an_answer_that_subclasses_the_right_one_is_still_another_requests() -> None:
    session = "0123456789abcdef0123456789abcdef"
    call = Caller(fw.PAIRS).call(
        fw.ReplySocketRequest(session, "10.0.0.5", 53, "10.0.0.1", 40000), fw.ReplySocketAnswer
    )
    request_id = request_id_of(call.frame())
    with pytest.raises(AnswerError, match="answered ReplySocketRequest with BypassSocketAnswer"):
        call.receive(encode_frame(request_id, fw.BypassSocketAnswer(session, "/run/fd.sock")))


def test_a_call_needs_the_tables_answer_type() -> None:
    caller = Caller(fw.PAIRS)
    with pytest.raises(LocalProtocolError, match="not answered by"):
        caller.call(fw.ListSessionsRequest(), fw.HeartbeatAnswer)
    with pytest.raises(LocalProtocolError, match="not a request of this set"):
        caller.call(cm.StatusRequest(), cm.StatusAnswer)


@sets
@given(data=st.data())
@settings(max_examples=30, deadline=None)
def test_a_server_replies_only_with_the_requests_answer(name: str, data: st.DataObject) -> None:
    _, pairs = SETS[name]
    for request_kind, answer_kind in pairs.answers.items():
        request, answer = data.draw(STRATEGIES[request_kind]), data.draw(STRATEGIES[answer_kind])
        assert decode_frame(pairs.reply(9, request, answer)) == (9, answer)
        wrong = next(kind for kind in pairs.answers.values() if kind is not answer_kind)
        with pytest.raises(LocalProtocolError, match="is not the answer to"):
            pairs.reply(9, request, data.draw(STRATEGIES[wrong]))


@sets
@given(request_id=request_ids, msg=frame_messages, text=st.text(max_size=3000))
@settings(max_examples=100, deadline=None)
def test_a_refused_frame_is_answered_under_its_id(
    name: str, request_id: int, msg: Message, text: str
) -> None:
    _, pairs = SETS[name]
    payload = encode_frame(request_id, msg)
    answer_id, error = decode_frame(pairs.refuse_frame(payload, text))
    assert answer_id == request_id_of(payload) == request_id
    assert type(error) is pairs.error and error.text == text[:2000]  # type: ignore[attr-defined]
    # A bad tag: the frame does not decode, but its id still reads.
    broken = msgpack.packb([request_id, 9999, "x"])
    assert decode_frame(pairs.refuse_frame(broken, "bad"))[0] == request_id


@given(payload=st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_an_unreadable_id_is_zero(payload: bytes) -> None:
    request_id = request_id_of(payload)
    assert 0 <= request_id <= MAX_REQUEST_ID
    assert decode_frame(fw.PAIRS.refuse_frame(None, "x"))[0] == 0


@pytest.mark.parametrize(
    "value", [[], [-1, 64], [MAX_REQUEST_ID + 1, 64], ["1", 64], [True, 64], [1.0, 64], 7]
)
def test_no_id_is_read_where_there_is_none(value: object) -> None:
    assert request_id_of(msgpack.packb(value)) == 0


def test_the_users_text_names_the_peer() -> None:
    assert AnswerError("no", refused=True).from_peer("the client", " said") == "the client said: no"
    assert AnswerError("answered A with B", refused=False).from_peer("x") == "x answered A with B"

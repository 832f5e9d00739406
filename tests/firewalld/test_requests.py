"""The request table: which requests are served, and in which session state."""

from __future__ import annotations

import pytest
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.requests import TABLE, handle
from shuttle_firewalld.sessions import Sessions
from shuttle_protocol.firewall_messages import (
    CloseSessionAnswer,
    CloseSessionRequest,
    ErrorAnswer,
    HeartbeatAnswer,
    HeartbeatRequest,
    OpenSessionAnswer,
    OpenSessionRequest,
)
from shuttle_protocol.schema import Message
from shuttle_protocol.stream_messages import Ping

from .conftest import FakeMethod, open_request

OPEN = open_request()
NOBODY_ELSES = "f" * 32


def test_the_table_as_it_stands() -> None:
    assert {kind: allowed.needs_own_session for kind, allowed in TABLE.items()} == {
        OpenSessionRequest: False,
        HeartbeatRequest: True,
        CloseSessionRequest: True,
    }


def test_open_needs_no_session(sessions: Sessions, method: FakeMethod) -> None:
    answer = handle(sessions, 1000, OPEN)
    assert isinstance(answer, OpenSessionAnswer)
    assert answer.lease == 6.0
    assert answer.method == "nat"
    assert len(answer.session) == 32
    assert [session.id for session in method.applied] == [answer.session]


def test_open_answers_the_method_applied(sessions: Sessions) -> None:
    answer = handle(sessions, 1000, open_request(method="auto"))
    assert isinstance(answer, OpenSessionAnswer)
    assert answer.method == "nft"


@pytest.mark.parametrize(
    ("request_type", "expected"),
    [(HeartbeatRequest, HeartbeatAnswer()), (CloseSessionRequest, CloseSessionAnswer())],
)
def test_in_an_own_session(
    sessions: Sessions, request_type: type[Message], expected: Message
) -> None:
    session_id = handle(sessions, 1000, OPEN).session  # type: ignore[attr-defined]
    assert handle(sessions, 1000, request_type(session_id)) == expected  # type: ignore[call-arg]


@pytest.mark.parametrize("request_type", [HeartbeatRequest, CloseSessionRequest])
def test_without_a_session(sessions: Sessions, request_type: type[Message]) -> None:
    with pytest.raises(RequestError, match=r"^no such session$"):
        handle(sessions, 1000, request_type(NOBODY_ELSES))  # type: ignore[call-arg]


@pytest.mark.parametrize("request_type", [HeartbeatRequest, CloseSessionRequest])
def test_in_another_uids_session(
    sessions: Sessions, method: FakeMethod, request_type: type[Message]
) -> None:
    session_id = handle(sessions, 1000, OPEN).session  # type: ignore[attr-defined]
    # The same words as for a session that does not exist: nothing to learn by probing.
    with pytest.raises(RequestError, match=r"^no such session$"):
        handle(sessions, 1001, request_type(session_id))  # type: ignore[call-arg]
    assert method.removed == []


def test_after_close_the_session_is_gone(sessions: Sessions) -> None:
    session_id = handle(sessions, 1000, OPEN).session  # type: ignore[attr-defined]
    handle(sessions, 1000, CloseSessionRequest(session_id))
    for request in (HeartbeatRequest(session_id), CloseSessionRequest(session_id)):
        with pytest.raises(RequestError, match=r"^no such session$"):
            handle(sessions, 1000, request)


@pytest.mark.parametrize(
    "message",
    [
        OpenSessionAnswer("a" * 32, 6.0, "nft"),
        HeartbeatAnswer(),
        CloseSessionAnswer(),
        ErrorAnswer("no"),
        Ping(1),
    ],
)
def test_anything_else_is_refused(sessions: Sessions, message: Message) -> None:
    with pytest.raises(RequestError, match="is not a request firewalld serves"):
        handle(sessions, 0, message)

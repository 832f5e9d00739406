"""The request table: which requests are served, and in which session state."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

import pytest
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.hosts_file import HostsFile
from shuttle_firewalld.policy import HOSTS, Entry, Policy
from shuttle_firewalld.requests import TABLE, handle
from shuttle_firewalld.sessions import Sessions
from shuttle_firewalld.transparent import Flow
from shuttle_protocol.firewall_messages import (
    ANY_OWNER,
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
    ReplySocketAnswer,
    ReplySocketRequest,
    SetHostsAnswer,
    SetHostsRequest,
    SetShortcutsAnswer,
    SetShortcutsRequest,
    SocketsAnswer,
    SocketsHandover,
    SocketsRequest,
    UpdateSessionAnswer,
    UpdateSessionRequest,
)
from shuttle_protocol.schema import Message
from shuttle_protocol.stream_messages import Ping

from .fakes import (
    FD_PATH,
    LISTENERS,
    POLICY_PATH,
    PROGRAM_PORT,
    TPROXY,
    FakeClock,
    FakeMethod,
    ReplySockets,
    open_request,
    program_of,
    target,
)

OPEN = open_request()
NOBODY_ELSES = "f" * 32


def test_the_table_as_it_stands() -> None:
    assert {
        kind: (allowed.needs_own_session, allowed.method, allowed.slow)
        for kind, allowed in TABLE.items()
    } == {
        OpenSessionRequest: (False, None, True),
        HeartbeatRequest: (True, None, False),
        CloseSessionRequest: (True, None, True),
        SocketsRequest: (True, "tproxy", False),
        ReplySocketRequest: (True, "tproxy", False),
        SetHostsRequest: (True, None, True),
        ListSessionsRequest: (False, None, False),
        UpdateSessionRequest: (True, None, True),
        BypassSocketRequest: (True, None, False),
        # nat and nft: Sessions refuses tproxy with its reason (test_sessions).
        SetShortcutsRequest: (True, None, True),
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
        SocketsAnswer("a" * 32, "/run/x", 1),
        ReplySocketAnswer("a" * 32, "/run/x"),
        SocketsHandover(("reply",)),
        ListSessionsAnswer(()),
        UpdateSessionAnswer(3),
        ErrorAnswer("no"),
        Ping(1),
    ],
)
def test_anything_else_is_refused(sessions: Sessions, message: Message) -> None:
    with pytest.raises(RequestError, match="is not a request firewalld serves"):
        handle(sessions, 0, message)


# --- listing and updating sessions ----------------------------------------------------------


def test_list_sessions_answers_the_callers_own(sessions: Sessions) -> None:
    mine = handle(sessions, 1000, OPEN).session  # type: ignore[attr-defined]
    roots = handle(sessions, 0, open_request(port=12301, uid=0)).session  # type: ignore[attr-defined]
    answer = handle(sessions, 1000, ListSessionsRequest())
    assert isinstance(answer, ListSessionsAnswer)
    assert [(entry.session, entry.caller) for entry in answer.sessions] == [(mine[:12], 1000)]
    everyone = handle(sessions, 0, ListSessionsRequest())
    assert isinstance(everyone, ListSessionsAnswer)
    assert [entry.session for entry in everyone.sessions] == [mine[:12], roots[:12]]
    assert handle(sessions, 1001, ListSessionsRequest()) == ListSessionsAnswer(())


SUBNETS = (target("192.0.2.0/24", 80, 90),)


def test_update_answers_the_new_rule_count(sessions: Sessions, method: FakeMethod) -> None:
    session_id = handle(sessions, 1000, OPEN).session  # type: ignore[attr-defined]
    answer = handle(sessions, 1000, UpdateSessionRequest(session_id, SUBNETS, ()))
    assert answer == UpdateSessionAnswer(2)
    assert [str(item) for item in method.updated[0][1]] == ["192.0.2.0/24 port 80-90"]


def test_update_in_another_uids_session(sessions: Sessions, method: FakeMethod) -> None:
    session_id = handle(sessions, 1000, OPEN).session  # type: ignore[attr-defined]
    for request in (
        UpdateSessionRequest(session_id, SUBNETS, ()),
        UpdateSessionRequest(NOBODY_ELSES, SUBNETS, ()),
    ):
        with pytest.raises(RequestError, match=r"^no such session$"):
            handle(sessions, 1001, request)
    assert method.updated == []


def test_set_shortcuts_answers_the_new_rule_count(sessions: Sessions, method: FakeMethod) -> None:
    session_id = handle(sessions, 1000, OPEN).session  # type: ignore[attr-defined]
    request = SetShortcutsRequest(session_id, (("10.1.0.2", 7007, 12300),), 200)
    assert handle(sessions, 1000, request) == SetShortcutsAnswer(3)
    with pytest.raises(RequestError, match=r"^no such session$"):
        handle(sessions, 1001, request)
    assert len(method.updated) == 1


# --- tproxy sessions: their sockets and reply sockets ------------------------------------


def tproxy_session(sessions: Sessions, uid: int = 1000) -> str:
    answer = handle(sessions, uid, TPROXY)
    assert isinstance(answer, OpenSessionAnswer)
    assert (answer.lease, answer.method) == (6.0, "tproxy")
    return answer.session


def test_a_tproxy_session_needs_no_listener_of_the_caller(tproxy_sessions: Sessions) -> None:
    # Port 1: nobody listens there, and the method does not care.
    session = tproxy_sessions.owned(tproxy_session(tproxy_sessions), 1000)
    assert session.port == 41000
    assert sorted(session.sockets) == ["tcp4", "tcp6", "udp4", "udp6"]


def test_auto_never_means_tproxy(tproxy_sessions: Sessions) -> None:
    answer = handle(tproxy_sessions, 1000, open_request(method="auto"))
    assert isinstance(answer, OpenSessionAnswer)
    assert answer.method == "nft"


def test_sockets_request_answers_a_token_the_path_and_the_port(tproxy_sessions: Sessions) -> None:
    session_id = tproxy_session(tproxy_sessions)
    answer = handle(tproxy_sessions, 1000, SocketsRequest(session_id))
    assert isinstance(answer, SocketsAnswer)
    assert (answer.path, answer.port) == (FD_PATH, 41000)
    assert len(answer.token) == 32
    assert answer.token != session_id


def test_reply_socket_request_answers_a_token(
    tproxy_sessions: Sessions, reply_sockets: ReplySockets
) -> None:
    session_id = tproxy_session(tproxy_sessions)
    request = ReplySocketRequest(session_id, "198.18.0.5", 53, "198.18.0.1", PROGRAM_PORT)
    answer = handle(tproxy_sessions, 1000, request)
    assert isinstance(answer, ReplySocketAnswer)
    assert answer.path == FD_PATH
    assert [(address, port) for address, port, _ in reply_sockets.made] == [("198.18.0.5", 53)]
    session = tproxy_sessions.owned(session_id, 1000)
    assert [tuple(map(str, flow)) for flow in session.flows] == [
        ("198.18.0.1", str(PROGRAM_PORT), "198.18.0.5", "53")
    ]


@pytest.mark.parametrize(
    ("address", "port", "why"),
    [
        ("192.0.2.1", 53, r"^192\.0\.2\.1:53 is not inside the session's subnets"),
        ("2001:db8::1", 53, r"^\[2001:db8::1\]:53 is not inside the session's subnets"),
        ("127.0.0.1", 53, "is not an address this session captures"),
    ],
)
def test_a_reply_socket_outside_the_capture_is_refused(
    tproxy_sessions: Sessions, reply_sockets: ReplySockets, address: str, port: int, why: str
) -> None:
    session_id = tproxy_session(tproxy_sessions)
    request = ReplySocketRequest(session_id, address, port, program_of(address), PROGRAM_PORT)
    with pytest.raises(RequestError, match=why):
        handle(tproxy_sessions, 1000, request)
    assert reply_sockets.made == []


@pytest.mark.parametrize(
    ("program", "port", "why"),
    [
        ("198.18.0.1", 40001, r"^the program's socket at 198\.18\.0\.1:40001 is uid 1001's, "),
        ("fd00:5e::1", 40001, r"^the program's socket at \[fd00:5e::1\]:40001 is uid 1001's"),
        # uid 1000's wildcard socket, and uid 1001's at the address itself, which wins.
        ("198.18.0.1", 40002, r"^the program's socket at 198\.18\.0\.1:40002 is uid 1001's, "),
        ("198.18.0.1", 40003, r"^no UDP socket takes datagrams at 198\.18\.0\.1:40003, where "),
        ("fd00:5e::2", PROGRAM_PORT, r"^no UDP socket takes datagrams at \[fd00:5e::2\]:40000"),
    ],
)
def test_a_reply_socket_for_a_program_of_another_uid_is_refused(
    tproxy_sessions: Sessions, reply_sockets: ReplySockets, program: str, port: int, why: str
) -> None:
    session_id = tproxy_session(tproxy_sessions)
    address = "fd00:5e::5" if ":" in program else "198.18.0.5"
    with pytest.raises(RequestError, match=why):
        handle(tproxy_sessions, 1000, ReplySocketRequest(session_id, address, 53, program, port))
    assert reply_sockets.made == []


def test_a_session_of_every_uid_answers_any_uids_program(
    tproxy_sessions: Sessions, reply_sockets: ReplySockets
) -> None:
    session = tproxy_sessions.open(
        0, open_request(method="tproxy", subnets=("198.18.0.0/15",), uid=ANY_OWNER)
    )
    tproxy_sessions.reply_socket(session, "198.18.0.5", 53, "198.18.0.1", 40001)
    assert len(reply_sockets.made) == 1


def test_flows_whose_program_is_gone_end_at_the_heartbeat(
    tproxy_sessions: Sessions, reply_sockets: ReplySockets
) -> None:
    session = tproxy_sessions.open(1000, TPROXY)
    tproxy_sessions.reply_socket(session, "198.18.0.5", 53, "198.18.0.1", PROGRAM_PORT)
    gone = Flow(ipaddress.ip_address("198.18.0.1"), 40009, ipaddress.ip_address("198.18.0.6"), 53)
    session.flows[gone] = None  # as if its program had closed the socket since
    handle(tproxy_sessions, 1000, HeartbeatRequest(session.id))
    assert reply_sockets.forgotten == [gone]
    assert [flow.program_port for flow in session.flows] == [PROGRAM_PORT]


@pytest.mark.parametrize(
    "request_type",
    [SocketsRequest, lambda session: ReplySocketRequest(session, "10.1.2.3", 53, "10.0.0.1", 9)],
)
def test_socket_requests_are_only_for_tproxy_sessions(
    tproxy_sessions: Sessions, request_type: Any
) -> None:
    session_id = handle(tproxy_sessions, 1000, open_request(method="nft")).session  # type: ignore[attr-defined]
    with pytest.raises(RequestError, match=r"^\w+ is only for tproxy sessions, this one is nft$"):
        handle(tproxy_sessions, 1000, request_type(session_id))


@pytest.mark.parametrize(
    "request_type",
    [
        SocketsRequest,
        lambda session: ReplySocketRequest(session, "198.18.0.5", 53, "198.18.0.1", PROGRAM_PORT),
    ],
)
def test_socket_requests_in_another_uids_session(
    tproxy_sessions: Sessions, reply_sockets: ReplySockets, request_type: Any
) -> None:
    session_id = tproxy_session(tproxy_sessions)
    with pytest.raises(RequestError, match=r"^no such session$"):
        handle(tproxy_sessions, 1001, request_type(session_id))
    assert len(tproxy_sessions.grants) == 0
    assert reply_sockets.made == []


# --- host names --------------------------------------------------------------------------

HOSTS_BLOCK = (
    "# shuttle session {} begin\n"
    "# managed by shuttle-firewalld: removed when the session ends; do not edit\n"
    "10.1.2.3 db1\n"
    "# shuttle session {} end\n"
)


@pytest.fixture
def hosts_path(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_bytes(b"127.0.0.1 localhost\n")
    return path


def sessions_on(hosts_path: Path, method: FakeMethod, clock: FakeClock, policy: Policy) -> Sessions:
    """As the sessions fixture, with the hosts file hosts_path and this policy."""
    return Sessions(
        {"nat": method, "nft": method},
        6.0,
        policy=policy,
        listeners_of_port=lambda port: LISTENERS.get(port, []),
        clock=clock,
        hosts=HostsFile(str(hosts_path)),
    )


@pytest.fixture
def hosts_sessions(method: FakeMethod, clock: FakeClock, hosts_path: Path) -> Sessions:
    """uid 1000 may set hosts."""
    policy = Policy(POLICY_PATH, (Entry(1000, None, frozenset({HOSTS})),))
    return sessions_on(hosts_path, method, clock, policy)


def set_db1(sessions: Sessions, uid: int = 1000, request: Any = OPEN) -> str:
    """Open a session of uid's and set db1 in it; the session id."""
    session_id: str = handle(sessions, uid, request).session  # type: ignore[attr-defined]
    answer = handle(sessions, uid, SetHostsRequest(session_id, (("db1", "10.1.2.3"),)))
    assert answer == SetHostsAnswer(1)
    return session_id


def only_localhost_and(session_id: str) -> str:
    return "127.0.0.1 localhost\n" + HOSTS_BLOCK.format(session_id[:12], session_id[:12])


def test_set_hosts_writes_the_sessions_block(hosts_sessions: Sessions, hosts_path: Path) -> None:
    session_id = set_db1(hosts_sessions)
    assert hosts_path.read_text() == only_localhost_and(session_id)
    answer = handle(hosts_sessions, 1000, SetHostsRequest(session_id, (("localhost", "10.6.6.6"),)))
    assert answer == SetHostsAnswer(0)  # the file has localhost already: skipped
    assert hosts_path.read_text() == "127.0.0.1 localhost\n"


def test_set_hosts_needs_the_hosts_permission(
    method: FakeMethod, clock: FakeClock, hosts_path: Path
) -> None:
    sessions = sessions_on(hosts_path, method, clock, Policy(POLICY_PATH))
    session_id = handle(sessions, 1000, OPEN).session  # type: ignore[attr-defined]
    with pytest.raises(RequestError) as refused:
        handle(sessions, 1000, SetHostsRequest(session_id, (("db1", "10.1.2.3"),)))
    assert str(refused.value) == (
        f"writing host names into the hosts file needs root or a policy entry in {POLICY_PATH} "
        "(allow USER|@GROUP hosts)"
    )
    assert hosts_path.read_text() == "127.0.0.1 localhost\n"


def test_root_may_set_hosts_without_a_policy_entry(
    method: FakeMethod, clock: FakeClock, hosts_path: Path
) -> None:
    sessions = sessions_on(hosts_path, method, clock, Policy(POLICY_PATH))
    session_id = set_db1(sessions, 0, open_request(port=12301, uid=0))
    assert hosts_path.read_text() == only_localhost_and(session_id)


def test_set_hosts_in_another_uids_session(hosts_sessions: Sessions, hosts_path: Path) -> None:
    session_id = set_db1(hosts_sessions)
    before = hosts_path.read_bytes()
    with pytest.raises(RequestError, match=r"^no such session$"):
        handle(hosts_sessions, 1001, SetHostsRequest(session_id, ()))
    assert hosts_path.read_bytes() == before


def close_it(sessions: Sessions, session_id: str, clock: FakeClock) -> None:
    handle(sessions, 1000, CloseSessionRequest(session_id))


def let_it_expire(sessions: Sessions, session_id: str, clock: FakeClock) -> None:
    clock.now += 7  # past the lease of 6 s
    sessions.expire()


def exit_firewalld(sessions: Sessions, session_id: str, clock: FakeClock) -> None:
    sessions.close_all("closed at exit")


@pytest.mark.parametrize("end", [close_it, let_it_expire, exit_firewalld])
def test_the_block_goes_with_the_session(
    hosts_sessions: Sessions, hosts_path: Path, clock: FakeClock, end: Any
) -> None:
    session_id = set_db1(hosts_sessions)
    end(hosts_sessions, session_id, clock)
    assert len(hosts_sessions) == 0
    assert hosts_path.read_text() == "127.0.0.1 localhost\n"


def test_a_session_that_set_no_hosts_leaves_the_file_alone(
    hosts_sessions: Sessions, hosts_path: Path
) -> None:
    inode = hosts_path.stat().st_ino  # a rewrite would replace the file: another inode
    session_id = handle(hosts_sessions, 1000, OPEN).session  # type: ignore[attr-defined]
    handle(hosts_sessions, 1000, CloseSessionRequest(session_id))
    assert hosts_path.stat().st_ino == inode


def test_a_hosts_file_that_fails_does_not_stop_the_close(
    hosts_sessions: Sessions,
    hosts_path: Path,
    method: FakeMethod,
    caplog: pytest.LogCaptureFixture,
) -> None:
    session_id = set_db1(hosts_sessions)
    hosts_path.unlink()
    hosts_path.mkdir()  # the next read is refused: not a regular file
    with caplog.at_level(logging.ERROR):
        assert handle(hosts_sessions, 1000, CloseSessionRequest(session_id)) == (
            CloseSessionAnswer()
        )
    assert [session.id for session in method.removed] == [session_id]
    assert f"removing the hosts block of session {session_id[:12]} failed" in caplog.text

"""Handing sockets over: the tokens (single use, short-lived, the owner's only, bounded), the
fd socket that redeems them, and the client's side of it, in one process over a real unix
socket."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from shuttle_client.firewall_session import FirewallError, fetch_sockets
from shuttle_firewalld import server
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.handover import (
    MAX_TOKENS_PER_SESSION,
    MAX_TOKENS_PER_UID,
    TOKEN_LIFETIME,
    Grants,
    HandoverRefused,
)
from shuttle_firewalld.server import MAX_WAITING, MAX_WAITING_PER_UID, WAIT_FOR_TOKEN, FdServer
from shuttle_firewalld.session import Session
from shuttle_firewalld.sessions import Sessions
from shuttle_protocol.firewall_messages import SocketsHandover
from shuttle_protocol.frames import decode_frame

from .daemon import NOBODY
from .fakes import PROGRAM_PORT, FakeClock, make_session

OWNER = 1000  # make_session's caller


def listeners_of(session: Session) -> dict[str, socket.socket]:
    session.sockets = {
        "tcp4": socket.socket(socket.AF_INET, socket.SOCK_STREAM),
        "udp4": socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
    }
    return dict(session.sockets)


def udp() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


@pytest.fixture
def grants(clock: FakeClock) -> Grants:
    return Grants("/run/x.fds", clock)


def test_a_token_fetches_the_listeners_once(grants: Grants) -> None:
    session = make_session()
    made = listeners_of(session)
    token = grants.issue(session)
    assert len(token) == 32
    handed = grants.redeem(token, OWNER)
    assert handed == list(made.items())
    assert session.sockets == {}
    with pytest.raises(HandoverRefused, match="no such token"):
        grants.redeem(token, OWNER)
    # The listeners are gone: no new token for them either.
    with pytest.raises(RequestError, match="handed over already"):
        grants.issue(session)
    for _, sock in handed:
        sock.close()


def test_two_tokens_for_the_listeners_hand_them_over_once(grants: Grants) -> None:
    session = make_session()
    listeners_of(session)
    first, second = grants.issue(session), grants.issue(session)
    for _, sock in grants.redeem(second, OWNER):
        sock.close()
    with pytest.raises(HandoverRefused, match="handed its sockets over already"):
        grants.redeem(first, OWNER)


def test_listeners_that_could_not_be_sent_are_given_back(grants: Grants) -> None:
    session = make_session()
    made = listeners_of(session)
    taken_from, handed = grants.take(grants.issue(session), OWNER)
    assert taken_from is session
    assert grants.give_back(session, handed)
    assert session.sockets == made
    # A reply socket is not given back: the caller closes it and the client asks anew.
    reply = udp()
    assert not grants.give_back(session, [("reply", reply)])
    reply.close()
    for _, sock in grants.redeem(grants.issue(session), OWNER):
        sock.close()


def test_a_reply_token_fetches_its_socket(grants: Grants) -> None:
    session = make_session()
    reply = udp()
    token = grants.issue(session, reply)
    assert grants.redeem(token, OWNER) == [("reply", reply)]
    assert reply.fileno() != -1  # the caller sends it, then closes it
    reply.close()


def test_another_uid_gets_nothing_and_spends_the_token(grants: Grants) -> None:
    session = make_session()
    reply = udp()
    token = grants.issue(session, reply)
    with pytest.raises(
        HandoverRefused, match=r"token of session 0123456789ab, which is uid 1000's"
    ):
        grants.redeem(token, 1001)
    assert reply.fileno() == -1  # closed: nobody will fetch it now
    with pytest.raises(HandoverRefused, match="no such token"):
        grants.redeem(token, OWNER)


def test_a_token_expires(grants: Grants, clock: FakeClock) -> None:
    session = make_session()
    listeners_of(session)
    token = grants.issue(session)
    clock.now += TOKEN_LIFETIME
    with pytest.raises(HandoverRefused, match="expired"):
        grants.redeem(token, OWNER)
    assert len(session.sockets) == 2  # still the session's, for a new token
    for sock in session.sockets.values():
        sock.close()


def test_expire_forgets_old_tokens_and_closes_their_sockets(
    grants: Grants, clock: FakeClock
) -> None:
    session = make_session()
    old = [udp() for _ in range(3)]
    for sock in old:
        grants.issue(session, sock)
    clock.now += TOKEN_LIFETIME / 2
    young = udp()
    kept = grants.issue(session, young)
    clock.now += TOKEN_LIFETIME / 2
    assert grants.expire() == 3
    assert [sock.fileno() for sock in old] == [-1, -1, -1]
    assert len(grants) == 1
    assert grants.redeem(kept, OWNER) == [("reply", young)]
    young.close()


def test_tokens_per_session_are_bounded(grants: Grants) -> None:
    session, other = make_session(), make_session()
    other.id = "f" * 32
    for _ in range(MAX_TOKENS_PER_SESSION):
        grants.issue(session, udp())
    extra = udp()
    with pytest.raises(RequestError, match=f"has {MAX_TOKENS_PER_SESSION} tokens"):
        grants.issue(session, extra)
    assert extra.fileno() == -1  # issue owns it, even when it refuses
    grants.issue(other, udp())  # another session has its own count
    assert grants.revoke(session) == MAX_TOKENS_PER_SESSION
    grants.issue(session, udp())
    grants.revoke(session)
    grants.revoke(other)
    assert len(grants) == 0


def test_tokens_per_uid_and_in_all_are_bounded(clock: FakeClock) -> None:
    """One member's sessions together, and all members together, hold a bounded number of
    reply sockets here: each one is a file descriptor of firewalld's."""
    grants = Grants("/run/x.fds", clock, max_tokens=MAX_TOKENS_PER_UID + 2)
    sessions = [make_session() for _ in range(MAX_TOKENS_PER_UID // MAX_TOKENS_PER_SESSION + 1)]
    for number, session in enumerate(sessions):
        session.id = f"{number:032x}"
    for session in sessions[:-1]:
        for _ in range(MAX_TOKENS_PER_SESSION):
            grants.issue(session, udp())
    extra = udp()
    with pytest.raises(RequestError, match=f"uid 1000 has {MAX_TOKENS_PER_UID} tokens"):
        grants.issue(sessions[-1], extra)  # a session of its own, and still refused
    assert extra.fileno() == -1
    stranger = make_session()
    stranger.id, stranger.caller = "e" * 32, 1001
    grants.issue(stranger, udp())  # another uid has its own count
    grants.issue(stranger, udp())
    with pytest.raises(RequestError, match=f"firewalld holds {MAX_TOKENS_PER_UID + 2} sockets"):
        grants.issue(stranger, udp())
    grants.revoke(sessions[0])
    grants.issue(sessions[-1], udp())  # room again, for both counts
    for session in [*sessions, stranger]:
        grants.revoke(session)
    assert len(grants) == 0


def test_closing_a_session_revokes_its_tokens(tproxy_sessions: Sessions) -> None:
    from .fakes import TPROXY

    session = tproxy_sessions.open(OWNER, TPROXY)
    token = tproxy_sessions.reply_socket(session, "198.18.0.5", 53, "198.18.0.1", PROGRAM_PORT)
    tproxy_sessions.close(session, "closed by test")
    assert len(tproxy_sessions.grants) == 0
    with pytest.raises(HandoverRefused, match="no such token"):
        tproxy_sessions.grants.redeem(token, OWNER)


def test_expire_expires_tokens_too(tproxy_sessions: Sessions, clock: FakeClock) -> None:
    from .fakes import TPROXY

    session = tproxy_sessions.open(OWNER, TPROXY)
    tproxy_sessions.reply_socket(session, "fd00:5e::5", 53, "fd00:5e::1", PROGRAM_PORT)
    clock.now += TOKEN_LIFETIME
    tproxy_sessions.renew(session)
    assert tproxy_sessions.expire() == 0
    assert len(tproxy_sessions.grants) == 0


# --- the fd socket, for real, in this process ------------------------------------------------


class FdSocket:
    """An FdServer on a real unix socket, served by a thread until closed."""

    def __init__(self, path: Path, grants: Grants) -> None:
        self.server = FdServer(str(path), os.getgid(), grants)
        self.path = str(path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        self.server.register(poller)
        while not self._stop.is_set():
            for fd, _ in poller.poll(50):
                self.server.serve(fd, poller)
            self.server.expire(poller)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.server.close()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the fd socket is root's")


@pytest.fixture
def fd_socket(tmp_path: Path, grants: Grants) -> Iterator[FdSocket]:
    if os.geteuid() != 0:
        pytest.skip("the fd socket is root's")
    served = FdSocket(tmp_path / "fw.sock.fds", grants)
    try:
        yield served
    finally:
        served.close()


def fetch(fd_socket: FdSocket, token: str) -> list[tuple[str, socket.socket]]:
    return asyncio.run(fetch_sockets(fd_socket.path, token, 5.0))


def test_the_fd_socket_is_private_to_the_group(fd_socket: FdSocket) -> None:
    info = os.stat(fd_socket.path)
    assert oct(info.st_mode & 0o777) == oct(0o660)
    assert (info.st_uid, info.st_gid) == (0, os.getgid())


def test_the_owner_fetches_the_sockets_with_their_kinds(
    fd_socket: FdSocket, grants: Grants
) -> None:
    session = make_session()
    session.caller = os.getuid()
    made = listeners_of(session)
    token = grants.issue(session)
    got = fetch(fd_socket, token)
    try:
        assert [(kind, sock.type) for kind, sock in got] == [
            ("tcp4", socket.SOCK_STREAM),
            ("udp4", socket.SOCK_DGRAM),
        ]
        assert [sock.fileno() for sock in made.values()] == [-1, -1]  # firewalld's copies
        assert not any(os.get_inheritable(sock.fileno()) for _, sock in got)
    finally:
        for _, sock in got:
            sock.close()


def test_a_refusal_is_the_end_of_the_connection_and_one_log_line(
    fd_socket: FdSocket, grants: Grants, caplog: pytest.LogCaptureFixture
) -> None:
    session = make_session()  # uid 1000's, not ours
    reply = udp()
    token = grants.issue(session, reply)
    with caplog.at_level(logging.WARNING), pytest.raises(FirewallError) as refused:
        fetch(fd_socket, token)
    assert str(refused.value) == (
        "shuttle-firewalld refused to hand the sockets over (token used, expired, or not ours: "
        "its log says which)"
    )
    assert [record.getMessage() for record in caplog.records] == [
        f"fd socket: refused uid {os.getuid()} (pid {os.getpid()}): token of session "
        "0123456789ab, which is uid 1000's"
    ]
    with pytest.raises(FirewallError, match="refused"):
        fetch(fd_socket, "x" * 32)


@needs_root
@pytest.mark.parametrize(
    "limit",
    [
        (MAX_WAITING_PER_UID, MAX_WAITING_PER_UID, "uid 0 has 8 connections waiting already"),
        (MAX_WAITING, MAX_WAITING, "64 connections wait already"),  # one uid may have all
    ],
)
def test_clients_that_send_no_token_are_bounded_and_dropped(
    tmp_path: Path,
    grants: Grants,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    limit: tuple[int, int, str],
) -> None:
    per_uid, connections, refusal = limit  # MAX_WAITING_PER_UID, connections to fill it
    monkeypatch.setattr(server, "MAX_WAITING_PER_UID", per_uid)
    clock = FakeClock()
    fds = FdServer(str(tmp_path / "fds"), os.getgid(), grants, clock)
    poller = zmq.Poller()
    fds.register(poller)
    clients = []
    try:
        for _ in range(connections + 1):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(fds.path)
            clients.append(client)
        clients[0].send(b"0123")  # a part of a token only
        for _ in range(10):  # bounded: each turn takes what is ready
            for fd, _ in poller.poll(50):
                fds.serve(fd, poller)
        with caplog.at_level(logging.WARNING):
            clock.now += WAIT_FOR_TOKEN
            fds.expire(poller)
        # One over the limit was closed at once; the others after their time.
        assert caplog.text.count("sent no token") == connections
        assert caplog.text.count(refusal) == 1
        for client in clients:
            client.settimeout(5)
            assert client.recv(1) == b""
    finally:
        for client in clients:
            client.close()
        fds.close()
    assert not (tmp_path / "fds").exists()


@needs_root
def test_a_client_gone_before_the_handover_leaves_the_listeners_to_the_session(
    tmp_path: Path, grants: Grants, caplog: pytest.LogCaptureFixture
) -> None:
    session = make_session()
    session.caller = os.getuid()
    made = listeners_of(session)
    token = grants.issue(session)
    fds = FdServer(str(tmp_path / "fds"), os.getgid(), grants)
    poller = zmq.Poller()
    fds.register(poller)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(fds.path)
            client.sendall(token.encode())
        with caplog.at_level(logging.WARNING):
            for _ in range(10):  # bounded: each turn takes what is ready
                for fd, _ in poller.poll(50):
                    fds.serve(fd, poller)
    finally:
        fds.close()
    assert "failed: [Errno 32] Broken pipe" in caplog.text
    assert session.sockets == made
    assert all(sock.fileno() != -1 for sock in made.values())
    for sock in made.values():
        sock.close()


def test_the_handover_frame_is_one_message_with_the_descriptors(
    fd_socket: FdSocket, grants: Grants
) -> None:
    session = make_session()
    session.caller = os.getuid()
    reply = udp()
    token = grants.issue(session, reply)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(fd_socket.path)
        client.sendall(token.encode())
        data, fds, _, _ = socket.recv_fds(client, 4096, 4)
        assert client.recv(1) == b""
    for fd in fds:
        os.close(fd)
    assert len(fds) == 1
    assert decode_frame(data) == (0, SocketsHandover(("reply",)))


IMPOSTOR = """\
import socket, sys
impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
impostor.bind("\\0" + sys.argv[1])
impostor.listen(1)
print("ready", flush=True)
sys.stdin.read()
"""


@needs_root
def test_the_client_refuses_a_socket_not_of_root() -> None:
    # An abstract socket: nobody may create one, unlike a file in a directory of root's.
    name = f"shuttle-test-impostor-{os.getpid()}"
    impostor = subprocess.Popen(
        [*NOBODY, sys.executable, "-c", IMPOSTOR, name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert impostor.stdout is not None
        assert impostor.stdout.readline() == "ready\n"
        with pytest.raises(
            FirewallError, match="is not shuttle-firewalld's: its owner is uid 65534"
        ):
            asyncio.run(fetch_sockets("\0" + name, "a" * 32, 5.0))
    finally:
        impostor.communicate(timeout=10)


def test_the_client_says_when_there_is_no_fd_socket(tmp_path: Path) -> None:
    path = tmp_path / "missing"
    with pytest.raises(FirewallError) as failed:
        asyncio.run(fetch_sockets(str(path), "a" * 32, 5.0))
    assert str(failed.value) == (
        f"cannot fetch the sockets from shuttle-firewalld on {path}: No such file or directory"
    )

"""Bypass sockets (--dns-domains): each session's own mark, the socket as the caller's own
(the kernel's socket table and its mark say so), and who gets one for which session.
tests/integration/test_split_dns.py shows the rules letting exactly them through."""

from __future__ import annotations

import os
import pwd
import socket

import pytest
from shuttle_firewalld.bypass import BYPASS_BASE, BYPASS_MARKS, bypass_socket, free_mark
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.methods.tproxy import MARK_BASE, OWN_IDS, REPLY_OFFSET, SLOTS
from shuttle_firewalld.policy import Policy
from shuttle_firewalld.requests import handle
from shuttle_firewalld.sessions import Sessions
from shuttle_protocol.firewall_messages import MAX_SESSIONS, BypassSocketAnswer, BypassSocketRequest

from .fakes import (
    FD_PATH,
    POLICY_PATH,
    FakeClock,
    FakeMethod,
    listening,
    make_session,
    open_request,
)

NOBODY = pwd.getpwnam("nobody")


def socket_owner(sock: socket.socket) -> int:
    """The uid /proc/net/udp or tcp gives for sock (bound first, to find it there)."""
    port = sock.getsockname()[1]
    kind = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
    suffix = "6" if sock.family == socket.AF_INET6 else ""
    with open(f"/proc/net/{kind}{suffix}") as table:
        for line in table.read().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}"):
                return int(fields[7])
    raise AssertionError(f"port {port} is not in /proc/net/{kind}{suffix}")


def test_bypass_marks_are_apart_from_tproxys() -> None:
    marks = range(BYPASS_BASE + 1, BYPASS_BASE + BYPASS_MARKS + 1)
    captures = set(OWN_IDS)
    replies = {MARK_BASE + REPLY_OFFSET + slot for slot in range(1, SLOTS + 1)}
    assert not (set(marks) & (captures | replies))
    assert BYPASS_MARKS >= MAX_SESSIONS


def test_each_open_session_has_a_mark_of_its_own_and_a_closed_ones_waits_its_turn() -> None:
    first, second = make_session(), make_session()
    first.bypass_mark = free_mark([])
    second.bypass_mark = free_mark([first])
    assert first.bypass_mark != second.bypass_mark
    # The first one closed: its mark, which its caller's sockets may still carry, is not next.
    assert free_mark([second]) not in (first.bypass_mark, second.bypass_mark)


def test_marks_in_use_are_passed_over() -> None:
    sessions = []
    for _ in range(3):
        session = make_session()
        session.bypass_mark = free_mark(sessions)
        sessions.append(session)
    assert len({session.bypass_mark for session in sessions}) == 3
    assert all(BYPASS_BASE < s.bypass_mark <= BYPASS_BASE + BYPASS_MARKS for s in sessions)


@pytest.mark.skipif(os.geteuid() != 0, reason="marking a socket needs CAP_NET_ADMIN")
@pytest.mark.parametrize("kind", ["udp4", "udp6", "tcp4", "tcp6"])
def test_a_bypass_socket_is_the_callers_and_carries_the_mark(kind: str) -> None:
    sock = bypass_socket(kind, BYPASS_BASE + 7, NOBODY.pw_uid)
    with sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == BYPASS_BASE + 7
        assert sock.type == (socket.SOCK_DGRAM if kind.startswith("udp") else socket.SOCK_STREAM)
        sock.bind(("::1" if kind.endswith("6") else "127.0.0.1", 0))
        if sock.type == socket.SOCK_STREAM:
            sock.listen(1)
        assert socket_owner(sock) == NOBODY.pw_uid
    # This thread is root's again.
    with open("/proc/thread-self/status") as status:
        lines = [line.split() for line in status if line.startswith(("Uid:", "Gid:"))]
    assert [line[4] for line in lines] == ["0", "0"]


def test_a_uid_without_a_passwd_entry_gets_none() -> None:
    with pytest.raises(RequestError, match="no passwd entry"):
        bypass_socket("udp4", BYPASS_BASE + 1, 4_000_000_001)


@pytest.mark.skipif(os.geteuid() != 0, reason="marking a socket needs CAP_NET_ADMIN")
def test_a_member_gets_one_for_its_own_session_with_dns_only(
    method: FakeMethod, clock: FakeClock
) -> None:
    uid = NOBODY.pw_uid  # a user this host has: the socket is made as its
    listeners = {
        12300: listening(12300, uid, "127.0.0.1")
        + listening(12300, uid, "127.0.0.1", protocol="udp"),
        12301: listening(12301, uid, "127.0.0.1"),
    }
    sessions = Sessions(
        {"nft": method},
        6.0,
        policy=Policy(POLICY_PATH),
        listeners_of_port=lambda port: listeners.get(port, []),
        clock=clock,
        fd_path=FD_PATH,
    )
    with_dns = sessions.open(uid, open_request(method="nft", uid=uid, dns=("10.53.0.53",)))
    without = sessions.open(uid, open_request(method="nft", uid=uid, port=12301))
    assert with_dns.bypass_mark != without.bypass_mark
    answer = handle(sessions, uid, BypassSocketRequest(with_dns.id, "udp4"))
    assert isinstance(answer, BypassSocketAnswer)
    [(kind, sock)] = sessions.grants.redeem(answer.token, uid)
    with sock:
        assert kind == "bypass"
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == with_dns.bypass_mark
    with pytest.raises(RequestError, match="no IPv6 nameserver"):
        handle(sessions, uid, BypassSocketRequest(with_dns.id, "udp6"))
    with pytest.raises(RequestError, match="no IPv4 nameserver"):
        handle(sessions, uid, BypassSocketRequest(without.id, "tcp4"))
    with pytest.raises(RequestError, match="no such session"):
        handle(sessions, uid + 1, BypassSocketRequest(with_dns.id, "udp4"))

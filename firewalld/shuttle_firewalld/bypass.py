"""Bypass sockets (--dns-domains): sockets firewalld makes for a session's caller, marked so
that the session's own DNS capture lets their queries to its nameservers through.

The client answers the names of the remote domains from the server's side and sends every
other captured query on, unchanged, to the resolver it was sent to. Sent from an ordinary
socket, that query would be captured again by the session's DNS rule. The client cannot
mark a socket itself (SO_MARK needs CAP_NET_ADMIN), so it asks firewalld for one: a UDP or
TCP socket with the session's bypass mark, made under the caller's filesystem ids so that
owner matches see the caller's socket, not root's, handed over like a reply socket.

Each method's DNS capture has one rule before it, in the chains of local traffic only:
packets with the session's bypass mark, from a socket of the session's caller (but in nat's
chain that forwarded traffic shares), to the session's nameservers, port 53, return.
Nothing else skips anything: the socket is the caller's own, and the mark is this session's
alone while it is open (no ip rule, no other session's rule names it), so it gives the
caller nothing it could not do without shuttle, where its queries went straight to those
resolvers.
"""

from __future__ import annotations

import ctypes
import itertools
import pwd
import secrets
import socket
from collections.abc import Iterable
from typing import Protocol

from shuttle_protocol.firewall_messages import BypassSocketAnswer, BypassSocketRequest

from .errors import RequestError
from .handover import Grants
from .methods.tproxy import MARK_BASE
from .session import Session

# Session bypass marks: BYPASS_BASE + 1 .. + BYPASS_MARKS, below the tproxy reply marks
# (MARK_BASE + 0x8000 + slot) and above its capture marks (MARK_BASE + slot).
BYPASS_BASE = MARK_BASE + 0x4000
BYPASS_MARKS = 0x3FFF
# Marks are handed out in turn, not lowest first: a socket outlives its session in its
# owner's hands, so a mark comes back only after every other one has been given out; and
# from a random start, so that after a restart the first sessions' marks are not those the
# last run gave first.
_turn = itertools.count(secrets.randbelow(BYPASS_MARKS))
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setfsuid.argtypes = _libc.setfsgid.argtypes = [ctypes.c_uint]
ASK = 0xFFFF_FFFF  # (uid_t) -1: setfsuid changes nothing and says the current one


def free_mark(sessions: Iterable[Session]) -> int:
    """The next bypass mark in turn that none of these (the open) sessions has."""
    used = {session.bypass_mark for session in sessions}
    for _ in range(BYPASS_MARKS):
        mark = BYPASS_BASE + 1 + next(_turn) % BYPASS_MARKS
        if mark not in used:
            return mark
    raise RequestError("every bypass mark is in use")  # more sessions than firewalld opens


def _fs_ids(uid: int, gid: int) -> tuple[int, int]:
    """Set this thread's filesystem uid and gid (per thread in the kernel, and glibc does
    not spread these two to the other threads); the ones before."""
    old_gid = _libc.setfsgid(gid)
    return _libc.setfsuid(uid), old_gid


def bypass_socket(kind: str, mark: int, uid: int) -> socket.socket:
    """An unbound socket of kind ("udp4", ..., "tcp6") with SO_MARK mark, uid's own.

    Owner matches (nft's meta skuid and skgid, iptables' -m owner) read the credentials of
    the socket's file, and the socket's own uid (routing's uidrange) comes from the same
    filesystem uid: so the socket is made under uid's filesystem ids (its passwd group),
    not root's, or every rule of this host that treats root's traffic apart would treat
    the caller's bypass queries as root's. Only the mark is set as root.
    """
    try:
        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        raise RequestError(f"cannot make a bypass socket: uid {uid} has no passwd entry") from None
    family = socket.AF_INET6 if kind.endswith("6") else socket.AF_INET
    proto = socket.SOCK_DGRAM if kind.startswith("udp") else socket.SOCK_STREAM
    before = _fs_ids(uid, gid)
    try:
        if _libc.setfsuid(ASK) != uid:  # the call reports no error: ask again
            raise RequestError(f"cannot make a bypass socket as uid {uid}")
        sock = socket.socket(family, proto)
    except OSError as exc:
        raise RequestError(f"cannot make a bypass socket: {exc.strerror}") from None
    finally:
        _fs_ids(*before)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    except OSError as exc:
        sock.close()
        raise RequestError(f"cannot make a bypass socket: {exc.strerror}") from None
    return sock


class WithGrants(Protocol):
    """What the handler needs of Sessions (imported here, it would import its way back)."""

    grants: Grants


def serve(
    sessions: WithGrants, caller: object, request: BypassSocketRequest, session: Session
) -> BypassSocketAnswer:
    """BypassSocketRequest (requests.TABLE): a token for a bypass socket of the session's
    caller, who owns the session (the table checked it)."""
    version = int(request.kind[-1])
    if not any(address.version == version for address in session.dns):
        raise RequestError(
            f"this session captures no IPv{version} nameserver: a bypass socket would bypass "
            "nothing"
        )
    sessions.grants.room(session)  # before the socket is made, not after
    # Made in the session's network namespace: a socket sends from the one it was made in.
    sock = session.netns.run(bypass_socket, request.kind, session.bypass_mark, session.caller)
    return BypassSocketAnswer(sessions.grants.issue(session, sock, "bypass"), sessions.grants.path)

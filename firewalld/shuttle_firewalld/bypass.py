"""Bypass sockets (--dns-domains): sockets firewalld makes for a session's caller, marked so
that the session's own DNS capture lets their queries to its nameservers through.

The client answers the names of the remote domains from the server's side and sends every
other captured query on, unchanged, to the resolver it was sent to. Sent from an ordinary
socket, that query would be captured again by the session's DNS rule. The client cannot
mark a socket itself (SO_MARK needs CAP_NET_ADMIN), so it asks firewalld for one: a UDP or
TCP socket with the session's bypass mark, and owned by the caller (fchown on a socket sets
the owner that `meta skuid` and `-m owner` see), handed over like a reply socket.

Each method's DNS capture has one rule before it, in the chains of local traffic only:
packets with the session's bypass mark, to the session's nameservers, port 53, return.
Nothing else skips anything: the socket is the caller's own, and the mark is this session's
alone (no ip rule, no other session's rule names it), so it gives the caller nothing it
could not do without shuttle, where its queries went straight to those resolvers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING

from shuttle_protocol.firewall_messages import (
    MAX_SESSIONS,
    BypassSocketAnswer,
    BypassSocketRequest,
)

from .errors import RequestError
from .methods.tproxy import MARK_BASE
from .session import Session

if TYPE_CHECKING:
    from .requests import Caller
    from .sessions import Sessions

# Session bypass marks: BYPASS_BASE + 1 .. + MAX_SESSIONS, below the tproxy reply marks
# (MARK_BASE + 0x8000 + slot) and above its capture marks (MARK_BASE + slot).
BYPASS_BASE = MARK_BASE + 0x4000


def free_mark(sessions: Iterable[Session]) -> int:
    """The lowest bypass mark that none of these (the open) sessions has."""
    used = {session.bypass_mark for session in sessions}
    for number in range(1, MAX_SESSIONS + 1):
        if BYPASS_BASE + number not in used:
            return BYPASS_BASE + number
    raise RequestError("every bypass mark is in use")  # more sessions than firewalld opens


def bypass_socket(kind: str, mark: int, uid: int) -> socket.socket:
    """An unbound socket of kind ("udp4", ..., "tcp6") with SO_MARK mark, owned by uid."""
    family = socket.AF_INET6 if kind.endswith("6") else socket.AF_INET
    proto = socket.SOCK_DGRAM if kind.startswith("udp") else socket.SOCK_STREAM
    try:
        sock = socket.socket(family, proto)
    except OSError as exc:
        raise RequestError(f"cannot make a bypass socket: {exc.strerror}") from None
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        # The caller's socket, not root's: owner matches (ours and any other rules of this
        # host) treat its packets as the caller's own.
        os.fchown(sock.fileno(), uid, -1)
    except OSError as exc:
        sock.close()
        raise RequestError(f"cannot make a bypass socket: {exc.strerror}") from None
    return sock


def serve(
    sessions: Sessions, caller: Caller, request: BypassSocketRequest, session: Session
) -> BypassSocketAnswer:
    """BypassSocketRequest: a token for a bypass socket of the session's caller."""
    version = int(request.kind[-1])
    if not any(address.version == version for address in session.dns):
        raise RequestError(
            f"this session captures no IPv{version} nameserver: a bypass socket would bypass "
            "nothing"
        )
    sessions.grants.room(session)  # before the socket is made, not after
    sock = bypass_socket(request.kind, session.bypass_mark, session.caller)
    return BypassSocketAnswer(sessions.grants.issue(session, sock, "bypass"), sessions.grants.path)

"""THE table of requests firewalld serves, and what each needs: nothing else decides.

A request either opens a session, or lists the sessions its caller may see (its own; root
sees all), or names an open session that its caller must own (a session of another uid is
reported as missing, so callers cannot probe each other); some need a session of one
method. Any other message, answers included, is refused. The table is unit-tested as it
stands.

The daemon has one other entry point, the fd socket (server.FdServer, beside the zmq
socket): it serves no request, only the one-time tokens that SocketsRequest and
ReplySocketRequest issue here, each redeemed once, by the uid it was issued to as the
kernel names the connection's peer (handover.Grants.take), for one SocketsHandover frame
with the sockets in SCM_RIGHTS.

It also says which requests change rules (run a tool, write the hosts file): the server
hands those to its worker thread, off the loop, and answers the others on the loop, under
Sessions.lock (see docs/firewalld.md, "One request at a time, off the loop").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, Union

from shuttle_protocol.firewall_messages import (
    BypassSocketRequest,
    CloseSessionAnswer,
    CloseSessionRequest,
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
    SocketsRequest,
    UpdateSessionAnswer,
    UpdateSessionRequest,
)
from shuttle_protocol.schema import REGISTRY, Message

from . import bypass
from .errors import RequestError
from .prepared import Prepared
from .session import Session
from .sessions import Sessions

R = TypeVar("R", bound=Message)


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the kernel says: its uid, and its pid (None: a caller inside
    firewalld's own process, whose sessions only their lease ends); and for a big
    OpenSession or UpdateSession, its subnets and excludes as offload.py prepared them (the
    request itself then holds a stand-in)."""

    uid: int
    pid: int | None = None
    prepared: tuple[Prepared, Prepared] | None = None


def _open(sessions: Sessions, caller: Caller, request: OpenSessionRequest) -> Message:
    opened = sessions.open(caller.uid, request, caller.pid, caller.prepared)
    return OpenSessionAnswer(opened.id, sessions.lease, opened.method)


def _heartbeat(
    sessions: Sessions, caller: Caller, request: HeartbeatRequest, session: Session
) -> Message:
    sessions.heartbeat(session)
    return HeartbeatAnswer()


def _close(
    sessions: Sessions, caller: Caller, request: CloseSessionRequest, session: Session
) -> Message:
    sessions.close(session, f"closed by uid {caller.uid}")
    return CloseSessionAnswer()


def _sockets(
    sessions: Sessions, caller: Caller, request: SocketsRequest, session: Session
) -> Message:
    token = sessions.grants.issue(session)
    return SocketsAnswer(token, sessions.grants.path, session.port)


def _reply_socket(
    sessions: Sessions, caller: Caller, request: ReplySocketRequest, session: Session
) -> Message:
    token = sessions.reply_socket(
        session, request.address, request.port, request.program_address, request.program_port
    )
    return ReplySocketAnswer(token, sessions.grants.path)


def _set_hosts(
    sessions: Sessions, caller: Caller, request: SetHostsRequest, session: Session
) -> Message:
    return SetHostsAnswer(sessions.set_hosts(session, request.hosts))


def _list(sessions: Sessions, caller: Caller, request: ListSessionsRequest) -> Message:
    return ListSessionsAnswer(sessions.visible(caller.uid))


def _update(
    sessions: Sessions, caller: Caller, request: UpdateSessionRequest, session: Session
) -> Message:
    rules = sessions.update(session, request.subnets, request.excludes, caller.prepared)
    return UpdateSessionAnswer(rules)


def _set_shortcuts(
    sessions: Sessions, caller: Caller, request: SetShortcutsRequest, session: Session
) -> Message:
    return SetShortcutsAnswer(sessions.set_shortcuts(session, request.shortcuts, request.limit))


@dataclass(frozen=True)
class OnSession(Generic[R]):
    """How firewalld serves a request whose `session` field must name an open session of
    the caller: the handler receives that session."""

    handler: Callable[[Sessions, Caller, R, Session], Message]
    # Only for a session of this method (None: any method).
    method: str | None = None
    # True: it changes rules, which takes a tool's time: the worker thread runs it, and
    # Sessions takes its lock only where it changes what the loop reads. False: quick,
    # served whole under Sessions.lock, by the loop.
    slow: bool = False
    needs_own_session: ClassVar[bool] = True

    def serve(self, sessions: Sessions, caller: Caller, request: R) -> Message:
        session = sessions.owned(request.session, caller.uid)  # type: ignore[attr-defined]
        if self.method is not None and session.method != self.method:
            raise RequestError(
                f"{type(request).__name__} is only for {self.method} sessions, "
                f"this one is {session.method}"
            )
        return self.handler(sessions, caller, request, session)


@dataclass(frozen=True)
class Alone(Generic[R]):
    """How firewalld serves a request that names no session."""

    handler: Callable[[Sessions, Caller, R], Message]
    slow: bool = False  # as OnSession.slow
    method: ClassVar[None] = None
    needs_own_session: ClassVar[bool] = False

    def serve(self, sessions: Sessions, caller: Caller, request: R) -> Message:
        return self.handler(sessions, caller, request)


Allowed = Union[OnSession[Any], Alone[Any]]

TABLE: Mapping[type[Message], Allowed] = {
    OpenSessionRequest: Alone(_open, slow=True),
    HeartbeatRequest: OnSession(_heartbeat),
    CloseSessionRequest: OnSession(_close, slow=True),
    SocketsRequest: OnSession(_sockets, method="tproxy"),
    ReplySocketRequest: OnSession(_reply_socket, method="tproxy"),
    SetHostsRequest: OnSession(_set_hosts, slow=True),
    ListSessionsRequest: Alone(_list),
    UpdateSessionRequest: OnSession(_update, slow=True),
    BypassSocketRequest: OnSession(bypass.serve),
    # Not method="nft": nat serves it too, and Sessions says why tproxy cannot.
    SetShortcutsRequest: OnSession(_set_shortcuts, slow=True),
}


def handle(
    sessions: Sessions,
    uid: int,
    request: Message,
    pid: int | None = None,
    prepared: tuple[Prepared, Prepared] | None = None,
) -> Message:
    """The answer to one decoded request from uid (and its process pid, and what offload.py
    prepared of it); RequestError if it is refused. Safe in the loop and in the worker
    thread alike."""
    allowed = TABLE.get(type(request))
    if allowed is None:
        raise RequestError(f"{type(request).__name__} is not a request firewalld serves")
    caller = Caller(uid, pid, prepared)
    if allowed.slow:
        return allowed.serve(sessions, caller, request)
    with sessions.lock:
        return allowed.serve(sessions, caller, request)


def is_slow(tag: object) -> bool:
    """Whether the request of this wire tag changes rules (unknown tags are quick: refused)."""
    cls = REGISTRY.get(tag) if type(tag) is int else None
    allowed = TABLE.get(cls) if cls is not None else None
    return allowed is not None and allowed.slow

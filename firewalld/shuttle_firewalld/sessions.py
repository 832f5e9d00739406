"""Open sessions: who owns each, what it captures, and when its lease runs out.

Every check that depends on the caller rather than on the message's form is made here:
the method exists, the redirect port is the caller's, the caller has not too many sessions.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Union

from .errors import RequestError
from .methods.base import Method
from .ports import port_owners

log = logging.getLogger(__name__)

MAX_SESSIONS_PER_UID = 16
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(eq=False)
class Session:
    """One caller's capture: in force from apply() until remove(), as long as its lease."""

    id: str
    uid: int
    method: str
    port: int
    subnets: tuple[Network, ...]
    excludes: tuple[Network, ...]
    deadline: float
    rules: int = 0

    @property
    def short_id(self) -> str:
        """The id's first 12 characters: enough to be unique here, short enough for names."""
        return self.id[:12]


class Sessions:
    """The registry of open sessions, and the only place that applies or removes them."""

    def __init__(
        self,
        methods: Mapping[str, Method],
        lease: float,
        owners_of_port: Callable[[int], set[int]] = port_owners,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lease = lease
        self._methods = methods
        self._owners_of_port = owners_of_port
        self._clock = clock
        self._open: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._open)

    def open(
        self, uid: int, method: str, port: int, subnets: Iterable[str], excludes: Iterable[str]
    ) -> Session:
        """Check the caller's request against policy, apply it, and register the session."""
        if method not in self._methods:
            raise RequestError(f"unknown method {method!r:.40}")
        if uid not in self._owners_of_port(port):
            raise RequestError(f"port {port} is not a listening socket of uid {uid}")
        if sum(1 for session in self._open.values() if session.uid == uid) >= MAX_SESSIONS_PER_UID:
            raise RequestError(f"uid {uid} already has {MAX_SESSIONS_PER_UID} sessions open")
        session_id = secrets.token_hex(16)
        # Rule names use the short id; two sessions sharing one would share their rules.
        if any(other.short_id == session_id[:12] for other in self._open.values()):
            raise RequestError("session id collision, please try again")
        session = Session(
            id=session_id,
            uid=uid,
            method=method,
            port=port,
            subnets=tuple(ipaddress.ip_network(text) for text in subnets),
            excludes=tuple(ipaddress.ip_network(text) for text in excludes),
            deadline=self._clock() + self.lease,
        )
        session.rules = self._methods[method].apply(session)
        self._open[session_id] = session
        log.info(
            "session %s opened by uid %d: %s to port %d, %d subnets, %d excludes, %d rules",
            session.short_id,
            uid,
            method,
            port,
            len(session.subnets),
            len(session.excludes),
            session.rules,
        )
        return session

    def owned(self, session_id: str, uid: int) -> Session:
        """The open session with this id if uid owns it; others' sessions stay invisible."""
        session = self._open.get(session_id)
        if session is None or session.uid != uid:
            raise RequestError("no such session")
        return session

    def renew(self, session: Session) -> None:
        session.deadline = self._clock() + self.lease

    def close(self, session: Session, why: str) -> None:
        """Forget the session and remove its rules; never raises."""
        self._open.pop(session.id, None)
        try:
            self._methods[session.method].remove(session)
        except Exception:  # a method must not raise here; if it does, the others still go
            log.exception("removing session %s failed", session.short_id)
        log.info(
            "session %s of uid %d %s: %d %s rules removed",
            session.short_id,
            session.uid,
            why,
            session.rules,
            session.method,
        )

    def expire(self) -> int:
        """Close every session whose lease has run out; return how many."""
        now = self._clock()
        expired = [session for session in self._open.values() if session.deadline <= now]
        for session in expired:
            self.close(session, f"expired (no heartbeat for {self.lease:g} s)")
        return len(expired)

    def close_all(self, why: str) -> None:
        for session in list(self._open.values()):
            self.close(session, why)

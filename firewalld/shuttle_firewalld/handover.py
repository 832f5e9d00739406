"""One-time tokens for sockets firewalld hands over: what each token fetches, for whom, until
when. The fd socket (server.FdServer) redeems them; a request handler issues them.

A token travels only in the zmq answer to the session's owner. Redeeming it needs, besides,
the kernel's word (SO_PEERCRED) that the process on the fd socket has the owner's uid, so a
token that leaks to another user is worth nothing; and it is spent at the first try.
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .errors import RequestError
from .session import Session

log = logging.getLogger(__name__)

TOKEN_LIFETIME = 10.0  # seconds: the client fetches at once, so this is generous
# Tokens not yet redeemed, per session, per uid (over all its sessions) and in all. A reply
# token holds an open socket here, so these also bound the file descriptors one session, one
# member and everyone together can make firewalld hold; main.py scales the total down to the
# open file limit.
MAX_TOKENS_PER_SESSION = 256
MAX_TOKENS_PER_UID = 1024
MAX_TOKENS = 4096


class HandoverRefused(Exception):
    """A token was presented in vain; str() says why, for firewalld's log only."""


@dataclass(eq=False)
class Grant:
    """What one token fetches: a reply or bypass socket (of kind), or (reply None) the
    session's listeners."""

    session: Session
    deadline: float
    reply: socket.socket | None = None
    kind: str = "reply"

    def close(self) -> None:
        if self.reply is not None:
            self.reply.close()
            self.reply = None


class Grants:
    """The tokens that are out, and the fd socket's path to fetch them at."""

    def __init__(self, path: str, clock: Callable[[], float], max_tokens: int = MAX_TOKENS) -> None:
        self.path = path
        self.max_tokens = max_tokens
        self._clock = clock
        self._grants: dict[str, Grant] = {}
        self._per_session: Counter[str] = Counter()
        self._per_uid: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self._grants)

    def room(self, session: Session) -> None:
        """RequestError if the session may not have another token now."""
        if self._per_session[session.id] >= MAX_TOKENS_PER_SESSION:
            raise RequestError(
                f"this session has {MAX_TOKENS_PER_SESSION} tokens that were not used yet; "
                "fetch those sockets first"
            )
        if self._per_uid[session.caller] >= MAX_TOKENS_PER_UID:
            raise RequestError(
                f"uid {session.caller} has {MAX_TOKENS_PER_UID} tokens that were not used yet; "
                "fetch those sockets first"
            )
        if len(self._grants) >= self.max_tokens:
            log.warning("%d tokens are out, the most this firewalld holds", self.max_tokens)
            raise RequestError(
                f"firewalld holds {self.max_tokens} sockets for tokens not used yet; try again "
                f"in {TOKEN_LIFETIME:g} s"
            )

    def issue(
        self, session: Session, reply: socket.socket | None = None, kind: str = "reply"
    ) -> str:
        """A token that fetches reply (a socket of kind), or the session's listeners; it
        owns reply from now, even if this raises (RequestError: too many tokens, or no
        listeners left)."""
        try:
            self.room(session)
            if reply is None and not session.sockets:
                raise RequestError("the sockets of this session were handed over already")
        except RequestError:
            if reply is not None:
                reply.close()
            raise
        token = secrets.token_hex(16)
        self._grants[token] = Grant(session, self._clock() + TOKEN_LIFETIME, reply, kind)
        self._per_session[session.id] += 1
        self._per_uid[session.caller] += 1
        return token

    def redeem(self, token: str, uid: int) -> list[tuple[str, socket.socket]]:
        """The sockets the token fetches, with their kinds, for the process of uid; the
        caller sends and closes them. HandoverRefused says why not. A token is spent
        whatever the outcome: a second try never gets anything."""
        return self.take(token, uid)[1]

    def take(self, token: str, uid: int) -> tuple[Session, list[tuple[str, socket.socket]]]:
        """As redeem, with the session the sockets are for (see give_back)."""
        grant = self._pop(token)
        if grant is None:
            raise HandoverRefused("no such token (never issued, used already, or expired)")
        try:
            session = grant.session
            if grant.deadline <= self._clock():
                raise HandoverRefused(f"token of session {session.short_id} expired")
            if uid != session.caller:
                raise HandoverRefused(
                    f"token of session {session.short_id}, which is uid {session.caller}'s"
                )
            if grant.reply is not None:
                reply, grant.reply = grant.reply, None
                return session, [(grant.kind, reply)]
            if not session.sockets:
                raise HandoverRefused(f"session {session.short_id} handed its sockets over already")
            listeners, session.sockets = session.sockets, {}
            return session, list(listeners.items())
        finally:
            grant.close()

    @staticmethod
    def give_back(session: Session, sockets: list[tuple[str, socket.socket]]) -> bool:
        """Return listeners that could not be sent to their session, which can then hand
        them over with a new token; False (the caller closes them) if they are no listeners.
        """
        if any(kind in ("reply", "bypass") for kind, _ in sockets) or session.sockets:
            return False
        session.sockets = dict(sockets)
        return True

    def revoke(self, session: Session) -> int:
        """Forget the session's tokens (it closes); return how many there were."""
        tokens = [token for token, grant in self._grants.items() if grant.session is session]
        for token in tokens:
            self._close(token)
        return len(tokens)

    def expire(self) -> int:
        """Forget the tokens whose time is up; return how many."""
        now = self._clock()
        tokens = []
        # Every token lives as long, so the dict's order (of issue) is the order of deadlines:
        # the loop stops at the first one still valid, however many are out.
        for token, grant in self._grants.items():
            if grant.deadline > now:
                break
            tokens.append(token)
        for token in tokens:
            self._close(token)
        return len(tokens)

    def _pop(self, token: str) -> Grant | None:
        grant = self._grants.pop(token, None)
        if grant is not None:
            self._per_session[grant.session.id] -= 1
            if self._per_session[grant.session.id] <= 0:
                del self._per_session[grant.session.id]
            self._per_uid[grant.session.caller] -= 1
            if self._per_uid[grant.session.caller] <= 0:
                del self._per_uid[grant.session.caller]
        return grant

    def _close(self, token: str) -> None:
        grant = self._pop(token)
        if grant is not None:
            grant.close()

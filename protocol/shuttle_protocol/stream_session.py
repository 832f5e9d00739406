"""THE table of the stream session's phases: what each end may receive before the greeting
and after it, the greeting's version check, and Ping answered by Pong. Nothing else decides.

The agent speaks first (Hello: version, capabilities, its Python); the client answers
Welcome. Until its peer's greeting has come, an end accepts only that greeting and Error;
after it, only what its table lists, and the greeting never again. Channel messages (Data,
Credit, Eof, Close, Datagram) are the Mux's and the channels' (mux.py, channel.py) and do not
come here. The drivers (shuttle_client.tunnel, shuttle_agent.main) keep only their dispatch.
"""

from typing import Dict, FrozenSet, NamedTuple, Optional, Tuple, Type

from . import PROTOCOL_VERSION
from . import stream_messages as sm
from .errors import RemoteProtocolError
from .mux import AGENT, CLIENT
from .schema import Message


class Phases(NamedTuple):
    """One end's table: the greeting it waits for, and what it accepts once greeted."""

    greeting: Type[Message]
    greeted: FrozenSet[Type[Message]]
    peer: str  # the other end, for the error text


# Ping is in both tables: the session answers it itself. Pong goes to the driver (the client
# matches its cookie; the agent, which never pings, ignores it).
TABLE: Dict[str, Phases] = {
    CLIENT: Phases(
        sm.Hello,
        frozenset(
            {
                sm.Opened,
                sm.Refused,
                sm.Ping,
                sm.Pong,
                sm.ProbeListening,
                sm.Routes,
                sm.Nameservers,
                sm.Hosts,
            }
        ),
        "agent",
    ),
    AGENT: Phases(
        sm.Welcome,
        frozenset(
            {
                sm.Open,
                sm.UdpOpen,
                sm.Ping,
                sm.Pong,
                sm.GetRoutes,
                sm.GetNameservers,
                sm.GetHosts,
                sm.ProbeListen,
                sm.Pace,
            }
        ),
        "client",
    ),
}


class SessionError(RemoteProtocolError):
    """The peer sent what its phase does not allow; the session must end with this text."""


class Step(NamedTuple):
    """What the driver does with a received message: send reply (if any), and handle the
    message itself if dispatch (else the session has dealt with it)."""

    reply: Optional[Message]
    dispatch: bool


class StreamSession:
    """One end's phase: waiting for the peer's greeting, or greeted."""

    def __init__(self, role: str, capabilities: Tuple[str, ...]) -> None:
        self.role = role
        self.phases = TABLE[role]
        self.capabilities = capabilities
        self.greeted = False
        self.peer_greeting: Optional[Message] = None  # the peer's Hello or Welcome

    def receive(self, msg: Message) -> Step:
        """Check msg against the phase; SessionError if it is not allowed there."""
        kind = type(msg)
        phases = self.phases
        if kind is sm.Error:
            return Step(None, True)
        name = kind.__name__
        if kind is phases.greeting:
            if self.greeted:
                raise SessionError(f"{name} twice")
            self._check_version(msg)
            self.greeted = True
            self.peer_greeting = msg
            reply = sm.Welcome(PROTOCOL_VERSION, self.capabilities) if kind is sm.Hello else None
            return Step(reply, True)
        if not self.greeted:
            raise SessionError(f"{name} before {phases.greeting.__name__}")
        if kind not in phases.greeted:
            raise SessionError(f"unexpected {name} from the {phases.peer}")
        if kind is sm.Ping:
            return Step(sm.Pong(msg.cookie), False)  # type: ignore[attr-defined]
        return Step(None, True)

    def _check_version(self, msg: Message) -> None:
        version = msg.version  # type: ignore[attr-defined]
        if version == PROTOCOL_VERSION:
            return
        if self.role == CLIENT:
            raise SessionError(
                f"protocol version mismatch: the agent speaks {version}, "
                f"this client {PROTOCOL_VERSION}"
            )
        raise SessionError(f"client speaks protocol {version}, agent {PROTOCOL_VERSION}")

"""Requests and answers between client and firewalld (tags 64-127), named as pairs.

firewalld is root, so every field is bounded here, and the networks are parsed here: a
message that exists is well-formed. What a caller may *do* is firewalld's policy, not ours.
"""

import ipaddress
from dataclasses import dataclass
from typing import Any, Tuple

from .checks import check_choice, check_int, check_number, check_text, check_text_tuple
from .errors import LocalProtocolError
from .schema import Message, message

METHODS = ("nat",)
MAX_SUBNETS = 50_000
SESSION_ID_LEN = 32


def check_networks(value: Any, name: str) -> None:
    """A tuple of strictly written networks, such as '10.1.0.0/16' or '2001:db8::/32'."""
    check_text_tuple(value, name, MAX_SUBNETS, 64)
    for text in value:
        # Python >= 3.9 parses an IPv6 scope id ("fe80::%<any text>/64") and prints it back.
        if "%" in text:
            raise LocalProtocolError(f"{name}: {text!r:.80} has a scope id")
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise LocalProtocolError(f"{name}: {exc}") from None
        if str(network) != text:
            raise LocalProtocolError(f"{name}: {text!r} is not written canonically ({network})")


def check_session_id(value: Any) -> None:
    check_text(value, "session", SESSION_ID_LEN)
    # isalnum() alone accepts any Unicode letter or digit, such as "\u00e9" or "\u00b2".
    if len(value) != SESSION_ID_LEN or not (value.isascii() and value.isalnum()):
        raise LocalProtocolError("session must be a 32-character token")


@message(64)
@dataclass(frozen=True)
class OpenSessionRequest(Message):
    """Capture TCP to subnets (minus excludes) of the caller's own traffic into its port."""

    __slots__ = ("method", "port", "subnets", "excludes")
    method: str
    port: int
    subnets: Tuple[str, ...]
    excludes: Tuple[str, ...]

    def __post_init__(self) -> None:
        check_choice(self.method, "method", METHODS)
        check_int(self.port, "port", 1, 65535)
        check_networks(self.subnets, "subnets")
        check_networks(self.excludes, "excludes")
        if not self.subnets:
            raise LocalProtocolError("a session needs at least one subnet")


@message(65)
@dataclass(frozen=True)
class OpenSessionAnswer(Message):
    """The session is in force; keep it alive with a heartbeat well within the lease."""

    __slots__ = ("session", "lease")
    session: str
    lease: float

    def __post_init__(self) -> None:
        check_session_id(self.session)
        check_number(self.lease, "lease", 0.1, 3600)


@message(66)
@dataclass(frozen=True)
class HeartbeatRequest(Message):
    """Renew the session's lease."""

    __slots__ = ("session",)
    session: str

    def __post_init__(self) -> None:
        check_session_id(self.session)


@message(67)
@dataclass(frozen=True)
class HeartbeatAnswer(Message):
    """The lease is renewed."""

    __slots__ = ()


@message(68)
@dataclass(frozen=True)
class CloseSessionRequest(Message):
    """Remove the session's rules now."""

    __slots__ = ("session",)
    session: str

    def __post_init__(self) -> None:
        check_session_id(self.session)


@message(69)
@dataclass(frozen=True)
class CloseSessionAnswer(Message):
    """The session's rules are gone."""

    __slots__ = ()


@message(127)
@dataclass(frozen=True)
class ErrorAnswer(Message):
    """The request was refused or failed; the text is for the user."""

    __slots__ = ("text",)
    text: str

    def __post_init__(self) -> None:
        check_text(self.text, "text", 2000)

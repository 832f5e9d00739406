"""Requests and answers between client and firewalld (tags 64-127), named as pairs.

firewalld is root, so every field is bounded here, and the networks are parsed here: a
message that exists is well-formed. What a caller may *do* is firewalld's policy, not ours.
"""

import ipaddress
from dataclasses import dataclass
from typing import Any, Tuple

from .checks import check_bool, check_choice, check_int, check_number, check_text
from .errors import LocalProtocolError
from .schema import Message, message

# "auto" asks firewalld to choose (nft where it works, else nat); the answer names the choice.
METHODS = ("auto", "nat", "nft")
APPLIED_METHODS = METHODS[1:]
MAX_SUBNETS = 50_000
SESSION_ID_LEN = 32
ANY_OWNER = -1  # uid or gid: do not match on it
MAX_ID = 2**32 - 2  # (uid_t)-1 is the kernel's "no id"
ALL_PORTS = (1, 65535)

# One captured or excluded destination: (network, first port, last port).
Target = Tuple[str, int, int]


def check_network(text: Any, name: str) -> None:
    """A strictly written network, such as '10.1.0.0/16' or '2001:db8::/32'."""
    check_text(text, name, 64)
    # Python >= 3.9 parses an IPv6 scope id ("fe80::%<any text>/64") and prints it back.
    if "%" in text:
        raise LocalProtocolError(f"{name}: {text!r:.80} has a scope id")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise LocalProtocolError(f"{name}: {exc}") from None
    if str(network) != text:
        raise LocalProtocolError(f"{name}: {text!r} is not written canonically ({network})")


def check_targets(value: Any, name: str) -> None:
    """A tuple of (network, first port, last port); ALL_PORTS means no port match."""
    if type(value) is not tuple or len(value) > MAX_SUBNETS:
        raise LocalProtocolError(f"{name} must be a list of at most {MAX_SUBNETS} items")
    for item in value:
        if type(item) is not tuple or len(item) != 3:
            raise LocalProtocolError(f"each of {name} is [network, first port, last port]")
        check_network(item[0], name)
        check_int(item[1], f"{name} first port", 1, 65535)
        check_int(item[2], f"{name} last port", item[1], 65535)


def check_owner(value: Any, name: str) -> None:
    check_int(value, name, ANY_OWNER, MAX_ID)


def check_session_id(value: Any) -> None:
    check_text(value, "session", SESSION_ID_LEN)
    # isalnum() alone accepts any Unicode letter or digit, such as "\u00e9" or "\u00b2".
    if len(value) != SESSION_ID_LEN or not (value.isascii() and value.isalnum()):
        raise LocalProtocolError("session must be a 32-character token")


@message(64)
@dataclass(frozen=True)
class OpenSessionRequest(Message):
    """Capture connections to subnets (minus excludes) into the caller's redirect port.

    port: the caller's listener, on 127.0.0.1 for IPv4 and ::1 for IPv6 (nat and nft).
    uid, gid: whose traffic is captured (ANY_OWNER: do not match); forward: also capture
    traffic routed through this host. Policy decides which of these the caller may ask.
    """

    __slots__ = ("method", "port", "subnets", "excludes", "uid", "gid", "forward")
    method: str
    port: int
    subnets: Tuple[Target, ...]
    excludes: Tuple[Target, ...]
    uid: int
    gid: int
    forward: bool

    def __post_init__(self) -> None:
        check_choice(self.method, "method", METHODS)
        check_int(self.port, "port", 1, 65535)
        check_targets(self.subnets, "subnets")
        check_targets(self.excludes, "excludes")
        if not self.subnets:
            raise LocalProtocolError("a session needs at least one subnet")
        check_owner(self.uid, "uid")
        check_owner(self.gid, "gid")
        check_bool(self.forward, "forward")


@message(65)
@dataclass(frozen=True)
class OpenSessionAnswer(Message):
    """The session is in force; keep it alive with a heartbeat well within the lease."""

    __slots__ = ("session", "lease", "method")
    session: str
    lease: float
    method: str

    def __post_init__(self) -> None:
        check_session_id(self.session)
        check_number(self.lease, "lease", 0.1, 3600)
        check_choice(self.method, "method", APPLIED_METHODS)


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

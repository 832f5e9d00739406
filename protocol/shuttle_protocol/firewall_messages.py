"""Requests and answers between client and firewalld (tags 64-127), named as pairs.

firewalld is root, so every field is bounded here, and the networks are parsed here: a
message that exists is well-formed. What a caller may *do* is firewalld's policy, not ours.
"""

from dataclasses import dataclass
from typing import Any, NamedTuple, Tuple

from .checks import (
    MAX_NAMESERVERS,
    check_address,
    check_addresses,
    check_bool,
    check_choice,
    check_hosts,
    check_int,
    check_network,
    check_number,
    check_text,
)
from .errors import LocalProtocolError
from .rpc import Pairs
from .schema import Message, message

# "auto" asks firewalld to choose (nft where it works, else nat; never tproxy, which the
# client must be built for); the answer names the choice.
METHODS = ("auto", "nat", "nft", "tproxy")
APPLIED_METHODS = METHODS[1:]
# The methods whose redirect can reach a listener of the caller's, such as ssh's forward
# (SetShortcutsRequest): a tproxy'd connection reaches only a transparent socket.
SHORTCUT_METHODS = ("nat", "nft")
MAX_SUBNETS = 50_000
MAX_HOSTS = 10_000  # a hosts block's entries: (name, address) pairs
SESSION_ID_LEN = 32
SHORT_ID_LEN = 12  # how logs, rule names and ListSessions name a session
# Open at once on one firewalld (each uid at most 16 of them): also ListSessions' bound.
MAX_SESSIONS = 1024
# More than any session has: nat makes a rule per target (both lists of at most
# MAX_SUBNETS, per IP version) and a few dozen more.
MAX_RULES = 1_000_000
MAX_SECONDS = 10.0**10  # a session's age in seconds: over three centuries
ANY_OWNER = -1  # uid or gid: do not match on it
MAX_ID = 2**32 - 2  # (uid_t)-1 is the kernel's "no id"
ALL_PORTS = (1, 65535)
TOKEN_LEN = 32  # a one-time token for the fd socket, the same form as a session id
MAX_PATH = 107  # sun_path holds 108 bytes, the last one a NUL
# The sockets firewalld hands over: the tproxy listeners per protocol and IP version, a
# reply socket (bound to an original destination, for UDP answers), and a bypass socket.
SOCKET_KINDS = ("tcp4", "udp4", "tcp6", "udp6", "reply", "bypass")
# What a bypass socket may be: its protocol and IP version.
BYPASS_KINDS = ("udp4", "udp6", "tcp4", "tcp6")
MAX_SHORTCUTS = 16  # a session's shortcuts: each is a rule per connection's first packet
# Connections open at once through one shortcut: ssh's own listener takes each of them, and
# must never hold thousands.
MAX_SHORTCUT_LIMIT = 4096

# One captured or excluded destination: (network, first port, last port).
Target = Tuple[str, int, int]
# One destination whose TCP goes to a loopback port instead: (address, port, local port).
Shortcut = Tuple[str, int, int]


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


def check_shortcuts(value: Any) -> None:
    """A tuple of at most MAX_SHORTCUTS (address, port, local port), no (address, port)
    twice."""
    if type(value) is not tuple or len(value) > MAX_SHORTCUTS:
        raise LocalProtocolError(f"shortcuts must be a list of at most {MAX_SHORTCUTS} items")
    for item in value:
        if type(item) is not tuple or len(item) != 3:
            raise LocalProtocolError("each of shortcuts is [address, port, local port]")
        check_address(item[0], "shortcut address")
        check_int(item[1], "shortcut port", 1, 65535)
        check_int(item[2], "shortcut local port", 1, 65535)
    # Only now: set() needs hashable items. Two rules for one destination: the second
    # would never match.
    if len({item[:2] for item in value}) != len(value):
        raise LocalProtocolError("shortcuts must go to distinct (address, port) pairs")


def check_owner(value: Any, name: str) -> None:
    check_int(value, name, ANY_OWNER, MAX_ID)


def check_session_id(value: Any, name: str = "session") -> None:
    check_text(value, name, SESSION_ID_LEN)
    # isalnum() alone accepts any Unicode letter or digit, such as "\u00e9" or "\u00b2".
    if len(value) != SESSION_ID_LEN or not (value.isascii() and value.isalnum()):
        raise LocalProtocolError(f"{name} must be a 32-character token")


def check_short_id(value: Any, name: str = "session") -> None:
    check_text(value, name, SHORT_ID_LEN)
    if len(value) != SHORT_ID_LEN or not (value.isascii() and value.isalnum()):
        raise LocalProtocolError(f"{name} must be a {SHORT_ID_LEN}-character short id")


def check_path(value: Any, name: str) -> None:
    """An absolute path that fits a unix socket address."""
    check_text(value, name, MAX_PATH)
    too_long = len(value.encode("utf-8", "replace")) > MAX_PATH
    if not value.startswith("/") or "\0" in value or too_long:
        raise LocalProtocolError(f"{name} must be an absolute path of at most {MAX_PATH} bytes")


def check_kinds(value: Any) -> None:
    """1 to 4 distinct socket kinds."""
    if type(value) is not tuple or not 1 <= len(value) <= 4:
        raise LocalProtocolError("kinds must be a list of 1 to 4 socket kinds")
    for kind in value:
        check_choice(kind, "kinds item", SOCKET_KINDS)
    if len(set(value)) != len(value):  # only now: set() needs hashable items
        raise LocalProtocolError("kinds must be distinct")


@message(64)
@dataclass(frozen=True)
class OpenSessionRequest(Message):
    """Capture connections to subnets (minus excludes) into the caller's redirect port.

    port: the caller's listener, on 127.0.0.1 for IPv4 and ::1 for IPv6 (nat and nft); the
    tproxy method ignores it (any valid port will do): firewalld makes the transparent
    sockets itself, on a port it picks, and SocketsAnswer names it.
    uid, gid: whose traffic is captured (ANY_OWNER: do not match); forward: also capture
    traffic routed through this host. Policy decides which of these the caller may ask.
    dns: nameserver addresses whose DNS traffic (UDP and TCP port 53) is captured as well,
    into the same port (nat and nft: the caller's UDP socket on 127.0.0.1 or ::1 too).
    """

    __slots__ = ("method", "port", "subnets", "excludes", "uid", "gid", "forward", "dns")
    method: str
    port: int
    subnets: Tuple[Target, ...]
    excludes: Tuple[Target, ...]
    uid: int
    gid: int
    forward: bool
    dns: Tuple[str, ...]

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
        check_addresses(self.dns, "dns", MAX_NAMESERVERS)


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


@message(70)
@dataclass(frozen=True)
class SocketsRequest(Message):
    """The transparent sockets of a tproxy session: a token to fetch them on the fd socket."""

    __slots__ = ("session",)
    session: str

    def __post_init__(self) -> None:
        check_session_id(self.session)


@message(71)
@dataclass(frozen=True)
class SocketsAnswer(Message):
    """Connect to path (a unix stream socket), send the token, receive SocketsHandover.

    port: where the session's packets are diverted to (the listeners' port).
    """

    __slots__ = ("token", "path", "port")
    token: str
    path: str
    port: int

    def __post_init__(self) -> None:
        check_session_id(self.token, "token")
        check_path(self.path, "path")
        check_int(self.port, "port", 1, 65535)


@message(72)
@dataclass(frozen=True)
class ReplySocketRequest(Message):
    """A transparent UDP socket bound to (address, port), an original destination inside
    the tproxy session's subnets, for the answers to one captured flow: they leave from it,
    and only towards the program that sent the flow, at (program_address, program_port),
    the captured datagrams' source. The two addresses are of one IP version."""

    __slots__ = ("session", "address", "port", "program_address", "program_port")
    session: str
    address: str
    port: int
    program_address: str
    program_port: int

    def __post_init__(self) -> None:
        check_session_id(self.session)
        check_address(self.address, "address")
        check_int(self.port, "port", 1, 65535)
        check_address(self.program_address, "program_address")
        check_int(self.program_port, "program_port", 1, 65535)
        if (":" in self.address) != (":" in self.program_address):
            raise LocalProtocolError("address and program_address must be of one IP version")


@message(73)
@dataclass(frozen=True)
class ReplySocketAnswer(Message):
    """Fetch the reply socket as SocketsAnswer says: connect to path, send the token."""

    __slots__ = ("token", "path")
    token: str
    path: str

    def __post_init__(self) -> None:
        check_session_id(self.token, "token")
        check_path(self.path, "path")


@message(74)
@dataclass(frozen=True)
class SocketsHandover(Message):
    """The one frame on the fd socket, its file descriptors in SCM_RIGHTS, one per kind."""

    __slots__ = ("kinds",)
    kinds: Tuple[str, ...]

    def __post_init__(self) -> None:
        check_kinds(self.kinds)


@message(75)
@dataclass(frozen=True)
class SetHostsRequest(Message):
    """Make the session's block of /etc/hosts hold exactly these (name, address) entries.

    The block is firewalld's, marked with the session, replaced atomically, and removed
    when the session ends or its lease runs out. An empty tuple empties it.
    """

    __slots__ = ("session", "hosts")
    session: str
    hosts: Tuple[Tuple[str, str], ...]

    def __post_init__(self) -> None:
        check_session_id(self.session)
        check_hosts(self.hosts, "hosts", MAX_HOSTS)


@message(76)
@dataclass(frozen=True)
class SetHostsAnswer(Message):
    """The block now holds count entries."""

    __slots__ = ("count",)
    count: int

    def __post_init__(self) -> None:
        check_int(self.count, "count", 0, MAX_HOSTS)


@message(77)
@dataclass(frozen=True)
class ListSessionsRequest(Message):
    """The sessions the caller may see: its own; root sees every session."""

    __slots__ = ()


class SessionEntry(NamedTuple):
    """One session as ListSessionsAnswer describes it; its full id stays with its owner."""

    session: str  # the short id, as in rule names and logs
    caller: int  # the uid that opened it and owns it
    method: str  # the method applied
    port: int  # where captured traffic goes
    subnets: int  # how many subnets, excludes and nameservers it has
    excludes: int
    nameservers: int
    rules: int  # how many firewall rules it installed
    uid: int  # whose traffic it captures (ANY_OWNER: every uid's)
    gid: int  # of which group (ANY_OWNER: any)
    forward: bool  # traffic routed through this host too
    opened: float  # seconds since its rules went in
    lease: float  # seconds left before it expires without a heartbeat
    hosts: int  # entries it has in the hosts file


def check_entry(value: Any) -> None:
    """A SessionEntry, or the plain tuple a frame decodes it as."""
    if not isinstance(value, tuple) or len(value) != len(SessionEntry._fields):
        raise LocalProtocolError(f"each session is a list of {len(SessionEntry._fields)} fields")
    entry = SessionEntry(*value)
    check_short_id(entry.session)
    check_int(entry.caller, "caller", 0, MAX_ID)
    check_choice(entry.method, "method", APPLIED_METHODS)
    check_int(entry.port, "port", 1, 65535)
    check_int(entry.subnets, "subnets", 0, MAX_SUBNETS)
    check_int(entry.excludes, "excludes", 0, MAX_SUBNETS)
    check_int(entry.nameservers, "nameservers", 0, MAX_NAMESERVERS)
    check_int(entry.rules, "rules", 0, MAX_RULES)
    check_owner(entry.uid, "uid")
    check_owner(entry.gid, "gid")
    check_bool(entry.forward, "forward")
    check_number(entry.opened, "opened", 0, MAX_SECONDS)
    check_number(entry.lease, "lease", 0, 3600)
    check_int(entry.hosts, "hosts", 0, MAX_HOSTS)


@message(78)
@dataclass(frozen=True)
class ListSessionsAnswer(Message):
    """The sessions the caller may see, at most MAX_SESSIONS of them."""

    __slots__ = ("sessions",)
    sessions: Tuple[SessionEntry, ...]

    def __post_init__(self) -> None:
        if type(self.sessions) is not tuple or len(self.sessions) > MAX_SESSIONS:
            raise LocalProtocolError(f"sessions must be a list of at most {MAX_SESSIONS} items")
        for item in self.sessions:
            check_entry(item)
        # A frame decodes each entry as a plain tuple: give it its field names back.
        object.__setattr__(self, "sessions", tuple(SessionEntry(*item) for item in self.sessions))


@message(79)
@dataclass(frozen=True)
class UpdateSessionRequest(Message):
    """Replace the session's subnets and excludes, all or nothing; the rest stays."""

    __slots__ = ("session", "subnets", "excludes")
    session: str
    subnets: Tuple[Target, ...]
    excludes: Tuple[Target, ...]

    def __post_init__(self) -> None:
        check_session_id(self.session)
        check_targets(self.subnets, "subnets")
        check_targets(self.excludes, "excludes")
        if not self.subnets:
            raise LocalProtocolError("a session needs at least one subnet")


@message(80)
@dataclass(frozen=True)
class UpdateSessionAnswer(Message):
    """The session now captures the new subnets, with this many rules."""

    __slots__ = ("rules",)
    rules: int

    def __post_init__(self) -> None:
        check_int(self.rules, "rules", 0, MAX_RULES)


@message(81)
@dataclass(frozen=True)
class BypassSocketRequest(Message):
    """A socket of the caller's own (kind: "udp4", "udp6", "tcp4" or "tcp6", unbound and
    unconnected) that carries the session's bypass mark: its DNS to the session's
    nameservers, port 53, is not captured by the session, so the queries that --dns-domains
    leaves to this host's resolvers reach them unchanged."""

    __slots__ = ("session", "kind")
    session: str
    kind: str

    def __post_init__(self) -> None:
        check_session_id(self.session)
        check_choice(self.kind, "kind", BYPASS_KINDS)


@message(82)
@dataclass(frozen=True)
class BypassSocketAnswer(ReplySocketAnswer):
    """Fetch the bypass socket as SocketsAnswer says: connect to path, send the token (the
    fields and checks of ReplySocketAnswer, under a tag of its own)."""

    __slots__ = ()


@message(83)
@dataclass(frozen=True)
class SetShortcutsRequest(Message):
    """Replace the session's shortcuts (an empty tuple removes them all), all or nothing.

    Each shortcut sends new TCP connections of the session's owner to (address, port)
    into the local port (on 127.0.0.1 for IPv4, ::1 for IPv6) instead of the session's
    port, while at most limit connections to (address, port) are open (the new one
    included); past that, new ones take the session's port. nat and nft sessions only.
    """

    __slots__ = ("session", "shortcuts", "limit")
    session: str
    shortcuts: Tuple[Shortcut, ...]
    limit: int

    def __post_init__(self) -> None:
        check_session_id(self.session)
        check_shortcuts(self.shortcuts)
        check_int(self.limit, "limit", 1, MAX_SHORTCUT_LIMIT)


@message(84)
@dataclass(frozen=True)
class SetShortcutsAnswer(Message):
    """The session's shortcuts are in force, with this many rules in all (as
    UpdateSessionAnswer counts them)."""

    __slots__ = ("rules",)
    rules: int

    def __post_init__(self) -> None:
        check_int(self.rules, "rules", 0, MAX_RULES)


@message(127)
@dataclass(frozen=True)
class ErrorAnswer(Message):
    """The request was refused or failed; the text is for the user."""

    __slots__ = ("text",)
    text: str

    def __post_init__(self) -> None:
        check_text(self.text, "text", 2000)


# Which answer goes with which request; any request may get an ErrorAnswer instead.
PAIRS = Pairs(
    {
        OpenSessionRequest: OpenSessionAnswer,
        HeartbeatRequest: HeartbeatAnswer,
        CloseSessionRequest: CloseSessionAnswer,
        SocketsRequest: SocketsAnswer,
        ReplySocketRequest: ReplySocketAnswer,
        SetHostsRequest: SetHostsAnswer,
        ListSessionsRequest: ListSessionsAnswer,
        UpdateSessionRequest: UpdateSessionAnswer,
        BypassSocketRequest: BypassSocketAnswer,
        SetShortcutsRequest: SetShortcutsAnswer,
    },
    ErrorAnswer,
)

"""The client's control sockets (tags 128-191): requests and answers for scripts, named as
pairs, and the events it publishes.

A running shuttle-client answers requests on a zmq ROUTER (one frame each, [request id,
tag, field, ...], as between client and firewalld) and publishes events on a PUB socket
beside it, each frame's id a sequence number so that a subscriber can tell it missed some.
Only the client's own uid may connect to either. docs/control.md documents the schema.
"""

from dataclasses import dataclass
from typing import Any, Tuple

from .checks import (
    MAX_ADDRESS,
    MAX_NAMESERVERS,
    check_addresses,
    check_choice,
    check_hosts,
    check_int,
    check_number,
    check_text,
)
from .errors import LocalProtocolError
from .firewall_messages import (
    APPLIED_METHODS,
    MAX_HOSTS,
    Shortcut,
    Target,
    check_shortcuts,
    check_targets,
)
from .rpc import Pairs
from .schema import Message, message

# The tunnel's states: starting (before the first ready), up (every stream connected),
# reconnecting (at least one stream lost; captured connections wait for it), firewall-lost
# (firewalld lost the session, a restart say: nothing is captured until it is opened
# again), stopping.
STATES = ("starting", "up", "reconnecting", "firewall-lost", "stopping")
# tcp: over the agent's channels; tcp-ssh: carried by ssh's own forwarding (the fast path).
PROTOS = ("tcp", "udp", "tcp-ssh")
# Which path TCP takes: every stream's ssh (up to its cap), the agent, or some of each.
TCP_PATHS = ("ssh", "agent", "mixed")
MAX_CONNECTIONS = 20_000  # entries in one ConnectionsAnswer; `total` says how many there are
MAX_COUNT = 2**63 - 1  # byte counters and the like
MAX_SECONDS = 10.0**9
MAX_STREAMS = 16
MAX_REASON = 1000
MAX_ENDPOINT = MAX_ADDRESS + 8  # "[address]:port"
MAX_HOST = 253  # a destination: an address, or a host name the agent resolves

# One captured connection or UDP flow: (channel, stream, proto, source "ip:port",
# destination host, destination port, bytes up, bytes down, seconds open).
Connection = Tuple[int, int, str, str, str, int, int, int, float]


def check_connection(value: Any) -> None:
    if type(value) is not tuple or len(value) != 9:
        raise LocalProtocolError(
            "each connection is [channel, stream, proto, source, host, port, "
            "bytes up, bytes down, seconds]"
        )
    channel, stream, proto, source, host, port, up, down, age = value
    check_int(channel, "channel", 1, MAX_COUNT)
    check_int(stream, "stream", 0, MAX_STREAMS - 1)
    check_choice(proto, "proto", PROTOS)
    check_text(source, "source", MAX_ENDPOINT)
    check_text(host, "host", MAX_HOST)
    check_int(port, "port", 1, 65535)
    check_int(up, "bytes up", 0, MAX_COUNT)
    check_int(down, "bytes down", 0, MAX_COUNT)
    check_number(age, "seconds", 0, MAX_SECONDS)


def check_changes(subnets: Any, excludes: Any) -> None:
    check_targets(subnets, "subnets")
    check_targets(excludes, "excludes")
    if not subnets and not excludes:
        raise LocalProtocolError("nothing to change: give subnets or excludes")


@message(128)
@dataclass(frozen=True)
class StatusRequest(Message):
    """How the tunnel is."""

    __slots__ = ()


@message(129)
@dataclass(frozen=True)
class StatusAnswer(Message):
    """The tunnel's state and totals. remote: the ssh destination; method: the firewall
    method in force ("" before the session opens); uptime: seconds since the client
    started; reconnects: streams reconnected so far; channels, flows: open TCP channels and
    UDP flows; bytes up / down: every channel's bytes so far, sent / received; tcp: the
    path TCP takes (TCP_PATHS)."""

    __slots__ = (
        "state",
        "remote",
        "method",
        "pid",
        "uptime",
        "reconnects",
        "streams_up",
        "streams",
        "channels",
        "flows",
        "bytes_up",
        "bytes_down",
        "tcp",
        "shortcuts",
    )
    state: str
    remote: str
    method: str
    pid: int
    uptime: float
    reconnects: int
    streams_up: int
    streams: int
    channels: int
    flows: int
    bytes_up: int
    bytes_down: int
    tcp: str
    shortcuts: Tuple[Shortcut, ...]

    def __post_init__(self) -> None:
        check_choice(self.state, "state", STATES)
        check_choice(self.tcp, "tcp", TCP_PATHS)
        check_shortcuts(self.shortcuts)
        check_text(self.remote, "remote", 1000)
        check_text(self.method, "method", 16)
        check_int(self.pid, "pid", 1, 2**31 - 1)
        check_number(self.uptime, "uptime", 0, MAX_SECONDS)
        check_int(self.reconnects, "reconnects", 0, MAX_COUNT)
        check_int(self.streams, "streams", 1, MAX_STREAMS)
        check_int(self.streams_up, "streams up", 0, self.streams)
        for name in ("channels", "flows", "bytes_up", "bytes_down"):
            check_int(getattr(self, name), name.replace("_", " "), 0, MAX_COUNT)


@message(130)
@dataclass(frozen=True)
class ConnectionsRequest(Message):
    """The open connections and UDP flows, with their bytes each way."""

    __slots__ = ()


@message(131)
@dataclass(frozen=True)
class ConnectionsAnswer(Message):
    """Up to MAX_CONNECTIONS of them (the oldest first); total: how many are open."""

    __slots__ = ("connections", "total")
    connections: Tuple[Connection, ...]
    total: int

    def __post_init__(self) -> None:
        if type(self.connections) is not tuple or len(self.connections) > MAX_CONNECTIONS:
            raise LocalProtocolError(f"connections: a list of at most {MAX_CONNECTIONS}")
        for item in self.connections:
            check_connection(item)
        check_int(self.total, "total", len(self.connections), MAX_COUNT)


@message(132)
@dataclass(frozen=True)
class RoutesRequest(Message):
    """What is captured."""

    __slots__ = ()


@message(133)
@dataclass(frozen=True)
class RoutesAnswer(Message):
    """The subnets captured and the excludes, as (network, first port, last port), and
    the nameservers whose DNS is captured."""

    __slots__ = ("subnets", "excludes", "dns")
    subnets: Tuple[Target, ...]
    excludes: Tuple[Target, ...]
    dns: Tuple[str, ...]

    def __post_init__(self) -> None:
        check_targets(self.subnets, "subnets")
        check_targets(self.excludes, "excludes")
        check_addresses(self.dns, "dns", MAX_NAMESERVERS)


@dataclass(frozen=True)
class _RoutesChange(Message):
    """Subnets and excludes to add or remove: at least one of either."""

    __slots__ = ("subnets", "excludes")
    subnets: Tuple[Target, ...]
    excludes: Tuple[Target, ...]

    def __post_init__(self) -> None:
        check_changes(self.subnets, self.excludes)


@dataclass(frozen=True)
class _RoutesNow(Message):
    """What is captured after a change: the subnets, and the excludes."""

    __slots__ = ("subnets", "excludes")
    subnets: Tuple[Target, ...]
    excludes: Tuple[Target, ...]

    def __post_init__(self) -> None:
        check_targets(self.subnets, "subnets")
        check_targets(self.excludes, "excludes")


@message(134)
@dataclass(frozen=True)
class AddRoutesRequest(_RoutesChange):
    """Capture these subnets too, and exclude these, from now on (no restart)."""

    __slots__ = ()


@message(135)
@dataclass(frozen=True)
class AddRoutesAnswer(_RoutesNow):
    """The rules are in force; what is captured now."""

    __slots__ = ()


@message(136)
@dataclass(frozen=True)
class RemoveRoutesRequest(_RoutesChange):
    """Stop capturing these subnets, and stop excluding these (each as it was added)."""

    __slots__ = ()


@message(137)
@dataclass(frozen=True)
class RemoveRoutesAnswer(_RoutesNow):
    """The rules are in force; what is captured now."""

    __slots__ = ()


@message(138)
@dataclass(frozen=True)
class HostsRequest(Message):
    """The host names -H put into the hosts file."""

    __slots__ = ()


@message(139)
@dataclass(frozen=True)
class HostsAnswer(Message):
    """(name, address) pairs; empty without -H."""

    __slots__ = ("hosts",)
    hosts: Tuple[Tuple[str, str], ...]

    def __post_init__(self) -> None:
        check_hosts(self.hosts, "hosts", MAX_HOSTS)


@message(140)
@dataclass(frozen=True)
class StopRequest(Message):
    """Stop the client, as SIGTERM does: the rules go, it exits 0."""

    __slots__ = ()


@message(141)
@dataclass(frozen=True)
class StopAnswer(Message):
    """The client is stopping."""

    __slots__ = ()


@message(159)
@dataclass(frozen=True)
class ControlError(Message):
    """The request was refused or failed; the text is for the user."""

    __slots__ = ("text",)
    text: str

    def __post_init__(self) -> None:
        check_text(self.text, "text", 2000)


# -- events, on the PUB socket ---------------------------------------------------------


@message(160)
@dataclass(frozen=True)
class Connected(Message):
    """A stream's agent greeted us: traffic flows through it."""

    __slots__ = ("stream", "remote")
    stream: int
    remote: str

    def __post_init__(self) -> None:
        check_int(self.stream, "stream", 0, MAX_STREAMS - 1)
        check_text(self.remote, "remote", 1000)


@message(161)
@dataclass(frozen=True)
class Disconnected(Message):
    """A stream was lost; its connections were reset."""

    __slots__ = ("stream", "reason")
    stream: int
    reason: str

    def __post_init__(self) -> None:
        check_int(self.stream, "stream", 0, MAX_STREAMS - 1)
        check_text(self.reason, "reason", MAX_REASON)


@message(162)
@dataclass(frozen=True)
class Reconnecting(Message):
    """The next attempt to bring a stream back starts in delay seconds."""

    __slots__ = ("stream", "attempt", "delay")
    stream: int
    attempt: int
    delay: float

    def __post_init__(self) -> None:
        check_int(self.stream, "stream", 0, MAX_STREAMS - 1)
        check_int(self.attempt, "attempt", 1, MAX_COUNT)
        check_number(self.delay, "delay", 0, 3600)


@message(163)
@dataclass(frozen=True)
class ChannelOpened(Message):
    """A captured connection or flow started: (channel, stream, proto, source, host, port)."""

    __slots__ = ("channel", "stream", "proto", "source", "host", "port")
    channel: int
    stream: int
    proto: str
    source: str
    host: str
    port: int

    def __post_init__(self) -> None:
        fields = (self.channel, self.stream, self.proto, self.source, self.host, self.port)
        check_connection((*fields, 0, 0, 0.0))


@message(164)
@dataclass(frozen=True)
class ChannelClosed(Message):
    """A connection or flow ended, with its totals."""

    __slots__ = ("channel", "stream", "bytes_up", "bytes_down")
    channel: int
    stream: int
    bytes_up: int
    bytes_down: int

    def __post_init__(self) -> None:
        check_int(self.channel, "channel", 1, MAX_COUNT)
        check_int(self.stream, "stream", 0, MAX_STREAMS - 1)
        check_int(self.bytes_up, "bytes up", 0, MAX_COUNT)
        check_int(self.bytes_down, "bytes down", 0, MAX_COUNT)


@message(165)
@dataclass(frozen=True)
class FirewallLost(Message):
    """The firewall session is gone (firewalld stopped or restarted): nothing is captured
    until FirewallBack."""

    __slots__ = ("reason",)
    reason: str

    def __post_init__(self) -> None:
        check_text(self.reason, "reason", MAX_REASON)


@message(166)
@dataclass(frozen=True)
class FirewallBack(Message):
    """The firewall session is open again, capturing as before, into port."""

    __slots__ = ("method", "port")
    method: str
    port: int

    def __post_init__(self) -> None:
        check_choice(self.method, "method", APPLIED_METHODS)
        check_int(self.port, "port", 1, 65535)


EVENTS = (
    Connected,
    Disconnected,
    Reconnecting,
    ChannelOpened,
    ChannelClosed,
    FirewallLost,
    FirewallBack,
)

# Which answer goes with which request; any request may get a ControlError instead.
PAIRS = Pairs(
    {
        StatusRequest: StatusAnswer,
        ConnectionsRequest: ConnectionsAnswer,
        RoutesRequest: RoutesAnswer,
        AddRoutesRequest: AddRoutesAnswer,
        RemoveRoutesRequest: RemoveRoutesAnswer,
        HostsRequest: HostsAnswer,
        StopRequest: StopAnswer,
    },
    ControlError,
)
REQUESTS = tuple(PAIRS.answers)

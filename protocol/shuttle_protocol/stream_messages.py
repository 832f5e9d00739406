"""Messages on the ssh pipe between client and agent (tags 1-63).

The client opens channels; each channel is one remote TCP connection, relayed with a credit
window in each direction, or one UDP flow, whose datagrams have no window and may be dropped
(see mux.py). Hello comes first from the agent, Welcome answers it.
"""

from dataclasses import dataclass
from typing import ClassVar, Tuple

from .checks import (
    MAX_NAMESERVERS,
    check_addresses,
    check_bool,
    check_bytes,
    check_hostname,
    check_hosts,
    check_int,
    check_network,
    check_text,
    check_text_tuple,
)
from .errors import LocalProtocolError
from .inflight import MAX_FLOOR, MIN_TARGET
from .schema import Message, message

MAX_CHANNEL = 2**63 - 1
MAX_DATA = 256 * 1024
MAX_CREDIT = 2**31
# Pace's bounds, microseconds: those of the in-flight controller's floor.
MIN_FLOOR_US = round(MIN_TARGET * 1_000_000)
MAX_FLOOR_US = round(MAX_FLOOR * 1_000_000)
# The largest UDP payload over IPv4 (65535 - 20 bytes of IP header - 8 of UDP header).
MAX_DATAGRAM = 65507
# Lists in one message stay under the decoder's 256 items per array; longer ones are sent
# as several messages.
MAX_LIST = 200
# What one session may report in all, over several messages; the client refuses more
# routes (a full Internet table has a million; nobody captures that) and ignores more names.
MAX_ROUTES = 10_000
MAX_HOST_ENTRIES = 10_000


def _check_channel(value: object) -> None:
    check_int(value, "channel", 1, MAX_CHANNEL)


# Bases of the messages that share their fields and checks; each registered message below
# names its own meaning (and tag), as control_messages' _RoutesChange does.


@dataclass(frozen=True)
class _Greeting(Message):
    """An end's protocol version and capabilities."""

    __slots__ = ("version", "capabilities")
    version: int
    capabilities: Tuple[str, ...]

    def __post_init__(self) -> None:
        check_int(self.version, "version", 0, 2**31)
        check_text_tuple(self.capabilities, "capabilities", 64)


@dataclass(frozen=True)
class _Connect(Message):
    """A new channel to host:port."""

    __slots__ = ("channel", "host", "port")
    channel: int
    host: str
    port: int

    def __post_init__(self) -> None:
        _check_channel(self.channel)
        check_text(self.host, "host", 255)
        check_int(self.port, "port", 1, 65535)


@dataclass(frozen=True)
class _Channel(Message):
    """A channel's event that has no other field."""

    __slots__ = ("channel",)
    channel: int

    def __post_init__(self) -> None:
        _check_channel(self.channel)


@dataclass(frozen=True)
class _Payload(Message):
    """Bytes for a channel, at most the subclass's MAX_PAYLOAD."""

    __slots__ = ("channel", "payload")
    MAX_PAYLOAD: ClassVar[int]
    channel: int
    payload: bytes

    def __post_init__(self) -> None:
        _check_channel(self.channel)
        check_bytes(self.payload, "payload", self.MAX_PAYLOAD)


@dataclass(frozen=True)
class _Cookie(Message):
    """A Ping's cookie, which its Pong echoes."""

    __slots__ = ("cookie",)
    cookie: int

    def __post_init__(self) -> None:
        check_int(self.cookie, "cookie", 0, 2**63 - 1)


@message(1)
@dataclass(frozen=True)
class Hello(_Greeting):
    """Agent → client, first: the agent's protocol version and capabilities, and its Python."""

    __slots__ = ("python",)
    python: str

    def __post_init__(self) -> None:
        super().__post_init__()
        check_text(self.python, "python", 200)


@message(2)
@dataclass(frozen=True)
class Welcome(_Greeting):
    """Client → agent, answering Hello: the client accepts the agent's version."""

    __slots__ = ()


@message(3)
@dataclass(frozen=True)
class Open(_Connect):
    """Client → agent: connect a new channel to host:port over TCP."""

    __slots__ = ()


@message(4)
@dataclass(frozen=True)
class Opened(_Channel):
    """Agent → client: the remote connect succeeded."""

    __slots__ = ()


@message(5)
@dataclass(frozen=True)
class Refused(Message):
    """Agent → client: the remote connect (or UDP socket) failed; errno and text say why.

    errno 0 means there is no errno (a name that did not resolve): the text says why.
    """

    __slots__ = ("channel", "errno", "reason")
    channel: int
    errno: int
    reason: str

    def __post_init__(self) -> None:
        _check_channel(self.channel)
        check_int(self.errno, "errno", 0, 4095)
        check_text(self.reason, "reason", 200)


@message(6)
@dataclass(frozen=True)
class Data(_Payload):
    """Either way: bytes for a channel, counted against the receiver's credit window."""

    __slots__ = ()
    MAX_PAYLOAD = MAX_DATA


@message(7)
@dataclass(frozen=True)
class Credit(Message):
    """Either way: the receiver has delivered n more bytes; the sender may send n more."""

    __slots__ = ("channel", "n")
    channel: int
    n: int

    def __post_init__(self) -> None:
        _check_channel(self.channel)
        check_int(self.n, "credit", 1, MAX_CREDIT)


@message(8)
@dataclass(frozen=True)
class Eof(_Channel):
    """Either way: the sender will send no more data on this channel (half close)."""

    __slots__ = ()


@message(9)
@dataclass(frozen=True)
class Close(Message):
    """Either way: abort the channel at once (the local socket is reset)."""

    __slots__ = ("channel", "reason")
    channel: int
    reason: str

    def __post_init__(self) -> None:
        _check_channel(self.channel)
        check_text(self.reason, "reason", 200)


@message(10)
@dataclass(frozen=True)
class Ping(_Cookie):
    """Either way: are you there? Answered by Pong with the same cookie."""

    __slots__ = ()


@message(11)
@dataclass(frozen=True)
class Pong(_Cookie):
    """Answer to Ping."""

    __slots__ = ()


@message(12)
@dataclass(frozen=True)
class Error(Message):
    """Either way: a fatal session error; the sender closes the pipe after it."""

    __slots__ = ("text",)
    text: str

    def __post_init__(self) -> None:
        check_text(self.text, "text", 1000)


@message(13)
@dataclass(frozen=True)
class UdpOpen(_Connect):
    """Client → agent: a new UDP flow to host:port; the agent answers only with Refused.

    host is an IP literal or a name the agent resolves. Datagram may follow at once. The flow
    ends with Close either way (socket error, idle expiry) or Refused (no socket, too many).
    """

    __slots__ = ()


@message(14)
@dataclass(frozen=True)
class Datagram(_Payload):
    """Either way: one UDP datagram of a flow opened by UdpOpen (no credit; may be empty)."""

    __slots__ = ()
    MAX_PAYLOAD = MAX_DATAGRAM


@message(15)
@dataclass(frozen=True)
class GetRoutes(Message):
    """Client → agent: which networks does the server route? Answered by Routes."""

    __slots__ = ()


@message(16)
@dataclass(frozen=True)
class Routes(Message):
    """Agent → client: networks of the server's routing tables (IPv4 and IPv6), as the kernel
    has them, default and local routes included: the client decides what to capture.

    more: another Routes message follows; the last one has more false.
    """

    __slots__ = ("networks", "more")
    networks: Tuple[str, ...]
    more: bool

    def __post_init__(self) -> None:
        if type(self.networks) is not tuple or len(self.networks) > MAX_LIST:
            raise LocalProtocolError(f"networks must be a list of at most {MAX_LIST} items")
        for network in self.networks:
            check_network(network, "networks item")
        check_bool(self.more, "more")


@message(17)
@dataclass(frozen=True)
class GetNameservers(Message):
    """Client → agent: which nameservers does the server use? Answered by Nameservers."""

    __slots__ = ()


@message(18)
@dataclass(frozen=True)
class Nameservers(Message):
    """Agent → client: the nameservers of the server's resolv.conf, in its order."""

    __slots__ = ("addresses",)
    addresses: Tuple[str, ...]

    def __post_init__(self) -> None:
        check_addresses(self.addresses, "addresses", MAX_NAMESERVERS)


@message(19)
@dataclass(frozen=True)
class GetHosts(Message):
    """Client → agent: find host names on the server's side (its /etc/hosts, reverse DNS of
    its neighbours, and these seed names resolved there). Answered by Hosts, as found."""

    __slots__ = ("seeds",)
    seeds: Tuple[str, ...]

    def __post_init__(self) -> None:
        if type(self.seeds) is not tuple or len(self.seeds) > MAX_LIST:
            raise LocalProtocolError(f"seeds must be a list of at most {MAX_LIST} items")
        for seed in self.seeds:
            check_hostname(seed, "seeds item")


@message(20)
@dataclass(frozen=True)
class Hosts(Message):
    """Agent → client: (host name, address) pairs found; several messages add up."""

    __slots__ = ("entries",)
    entries: Tuple[Tuple[str, str], ...]

    def __post_init__(self) -> None:
        check_hosts(self.entries, "entries", MAX_LIST)


@message(21)
@dataclass(frozen=True)
class ProbeListen(Message):
    """Client → agent: listen on a loopback port of the server for one connection, which the
    client opens through ssh's own forwarding to learn whether sshd forwards TCP for it."""

    __slots__ = ()


@message(22)
@dataclass(frozen=True)
class ProbeListening(Message):
    """Agent → client, answering ProbeListen: the port on 127.0.0.1 (0: it could not listen)."""

    __slots__ = ("port",)
    port: int

    def __post_init__(self) -> None:
        check_int(self.port, "port", 0, 65535)


@message(23)
@dataclass(frozen=True)
class Widen(Message):
    """Either way: the receiver widened the channel's window by n; the sender may send n
    more, none of which is a grant. Kept apart from Credit so that the sender's count of
    bytes in flight stays exact (the in-flight controller times grants)."""

    __slots__ = ("channel", "n")
    channel: int
    n: int

    def __post_init__(self) -> None:
        _check_channel(self.channel)
        check_int(self.n, "widening", 1, MAX_CREDIT)


@message(24)
@dataclass(frozen=True)
class Pace(Message):
    """Client → agent: the queueing delay, in microseconds, that the agent's in-flight
    controller allows at least (inflight.py): higher while a bulk transfer has the ssh
    connection to itself, back to the least while something interactive shares it
    (agent_sessions.py decides)."""

    __slots__ = ("floor_us",)
    floor_us: int

    def __post_init__(self) -> None:
        check_int(self.floor_us, "queueing floor", MIN_FLOOR_US, MAX_FLOOR_US)

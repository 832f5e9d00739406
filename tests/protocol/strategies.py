"""Hypothesis strategies and fixed examples for every registered message, plus wire helpers.

Each table is keyed by message class and checked against the registry (test_schema.py), so
a new message type without a strategy, an example or bad values makes a test fail.
"""

import ipaddress
import math
import re
import string
from typing import Any, Callable, Dict, List, Tuple, Type
from unittest import mock

import msgpack
import msgpack.fallback
from hypothesis import strategies as st
from shuttle_protocol import control_messages as cm
from shuttle_protocol import firewall_messages as fw
from shuttle_protocol import stream_messages as sm
from shuttle_protocol.checks import MAX_ADDRESS, MAX_NAMESERVERS
from shuttle_protocol.schema import FRAME_TAGS, REGISTRY, STREAM_TAGS, Message
from shuttle_protocol.stream import StreamDecoder

# -- the two msgpack implementations -------------------------------------------------------
# The agent runs on servers without msgpack's C extension, so decoders are tested with both.

IMPLEMENTATIONS = {"c": msgpack.Unpacker, "fallback": msgpack.fallback.Unpacker}


def make_decoder(impl: str, **kwargs: Any) -> StreamDecoder:
    """A StreamDecoder built on the named msgpack implementation."""
    with mock.patch.object(msgpack, "Unpacker", IMPLEMENTATIONS[impl]):
        return StreamDecoder(**kwargs)


def with_impl(impl: str, function: Callable[..., Any], *args: Any) -> Any:
    """Call function with msgpack.Unpacker replaced by the named implementation."""
    with mock.patch.object(msgpack, "Unpacker", IMPLEMENTATIONS[impl]):
        return function(*args)


def pack(value: Any) -> bytes:
    """Raw msgpack bytes of any value, bypassing the message constructors."""
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def wire_fields(msg: Message) -> Tuple[Any, ...]:
    return tuple(getattr(msg, name) for name in type(msg).FIELDS)


def survives_wire(value: Any) -> bool:
    """Whether value comes back from msgpack as the same type and value."""
    try:
        back = msgpack.unpackb(pack(value), use_list=False, raw=False)
    except (ValueError, TypeError, OverflowError):
        return False
    return type(back) is type(value) and repr(back) == repr(value)


# -- valid field values ----------------------------------------------------------------------

channels = st.integers(1, sm.MAX_CHANNEL)
texts = st.text  # hypothesis text excludes surrogates, so it always encodes as UTF-8


def text_tuples(max_items: int, max_len: int = 64) -> st.SearchStrategy[Tuple[str, ...]]:
    return st.lists(st.text(max_size=max_len), max_size=max_items).map(tuple)


def _network(address: Any, prefix: int) -> str:
    return str(ipaddress.ip_network((address, prefix), strict=False))


def _not_mapped(text: str) -> bool:
    """IPv4-mapped IPv6 addresses are refused by the checks (their text depends on Python)."""
    address = ipaddress.ip_network(text).network_address
    return address.version == 4 or address.ipv4_mapped is None


networks = st.one_of(
    st.builds(_network, st.ip_addresses(v=4), st.integers(0, 32)),
    st.builds(_network, st.ip_addresses(v=6), st.integers(0, 128)).filter(_not_mapped),
)
ports = st.integers(1, 65535)


def _target(network: str, a: int, b: int) -> fw.Target:
    return (network, min(a, b), max(a, b))


# One port, a range, or ALL_PORTS (no port match), as the client writes them.
targets = st.one_of(
    st.builds(_target, networks, ports, ports),
    st.builds(lambda network, port: (network, port, port), networks, ports),
    st.builds(lambda network: (network, *fw.ALL_PORTS), networks),
)
# Small counts: every message must also fit the stream carrier (256 items per array).
target_tuples = st.lists(targets, max_size=8).map(tuple)
owners = st.one_of(st.sampled_from([fw.ANY_OWNER, 0, fw.MAX_ID]), st.integers(-1, fw.MAX_ID))
session_ids = st.text(string.ascii_letters + string.digits, min_size=32, max_size=32)
leases = st.one_of(
    st.floats(0.1, 3600, allow_nan=False, allow_infinity=False), st.integers(1, 3600)
)
v4_addresses = st.ip_addresses(v=4).map(str)
v6_addresses = st.ip_addresses(v=6).map(str).filter(_not_mapped)
addresses = st.one_of(v4_addresses, v6_addresses)
# A session's shortcuts: (address, port, local port), no (address, port) twice.
shortcuts = st.lists(
    st.tuples(addresses, ports, ports),
    max_size=fw.MAX_SHORTCUTS,
    unique_by=lambda shortcut: shortcut[:2],
).map(tuple)
socket_paths = st.text(string.ascii_letters + string.digits + "._-/", max_size=fw.MAX_PATH - 1).map(
    lambda tail: "/" + tail
)
_labels = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
_last_labels = st.from_regex(r"[A-Za-z]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
hostnames = st.builds(
    lambda labels, last: ".".join([*labels, last]), st.lists(_labels, max_size=4), _last_labels
)
host_entries = st.lists(st.tuples(hostnames, addresses), max_size=20).map(tuple)
_seconds = st.floats(0, 3600, allow_nan=False, allow_infinity=False)
session_entries = st.builds(
    fw.SessionEntry,
    st.text(string.ascii_lowercase + string.digits, min_size=12, max_size=12),
    st.integers(0, fw.MAX_ID),
    st.sampled_from(fw.APPLIED_METHODS),
    ports,
    st.integers(0, fw.MAX_SUBNETS),
    st.integers(0, fw.MAX_SUBNETS),
    st.integers(0, MAX_NAMESERVERS),
    st.integers(0, fw.MAX_RULES),
    owners,
    owners,
    st.booleans(),
    st.one_of(_seconds, st.integers(0, 10**9)),
    _seconds,
    st.integers(0, fw.MAX_HOSTS),
)
counts = st.integers(0, cm.MAX_COUNT)
streams = st.integers(0, cm.MAX_STREAMS - 1)
_endpoints = st.builds(
    lambda address, port: f"[{address}]:{port}" if ":" in address else f"{address}:{port}",
    addresses,
    ports,
)
connections = st.tuples(
    channels,
    streams,
    st.sampled_from(cm.PROTOS),
    _endpoints,
    st.one_of(addresses, hostnames),
    ports,
    counts,
    counts,
    _seconds,
)
kind_tuples = st.lists(st.sampled_from(fw.SOCKET_KINDS), min_size=1, max_size=4, unique=True).map(
    tuple
)

STRATEGIES: Dict[Type[Message], st.SearchStrategy[Message]] = {
    sm.Hello: st.builds(sm.Hello, st.integers(0, 2**31), text_tuples(64), st.text(max_size=200)),
    sm.Welcome: st.builds(sm.Welcome, st.integers(0, 2**31), text_tuples(64)),
    sm.Open: st.builds(sm.Open, channels, st.text(max_size=255), st.integers(1, 65535)),
    sm.Opened: st.builds(sm.Opened, channels),
    sm.Refused: st.builds(sm.Refused, channels, st.integers(0, 4095), st.text(max_size=200)),
    sm.Data: st.builds(sm.Data, channels, st.binary(max_size=2048)),
    sm.Credit: st.builds(sm.Credit, channels, st.integers(1, sm.MAX_CREDIT)),
    sm.Widen: st.builds(sm.Widen, channels, st.integers(1, sm.MAX_CREDIT)),
    sm.Pace: st.builds(sm.Pace, st.integers(sm.MIN_FLOOR_US, sm.MAX_FLOOR_US)),
    sm.Eof: st.builds(sm.Eof, channels),
    sm.Close: st.builds(sm.Close, channels, st.text(max_size=200)),
    sm.Ping: st.builds(sm.Ping, st.integers(0, 2**63 - 1)),
    sm.Pong: st.builds(sm.Pong, st.integers(0, 2**63 - 1)),
    sm.Error: st.builds(sm.Error, st.text(max_size=1000)),
    sm.UdpOpen: st.builds(sm.UdpOpen, channels, st.text(max_size=255), ports),
    sm.Datagram: st.builds(
        sm.Datagram,
        channels,
        st.one_of(st.binary(max_size=2048), st.just(b"\xff" * sm.MAX_DATAGRAM)),
    ),
    sm.GetRoutes: st.builds(sm.GetRoutes),
    sm.Routes: st.builds(
        sm.Routes, st.lists(networks, max_size=sm.MAX_LIST).map(tuple), st.booleans()
    ),
    sm.GetNameservers: st.builds(sm.GetNameservers),
    sm.Nameservers: st.builds(
        sm.Nameservers, st.lists(addresses, max_size=MAX_NAMESERVERS).map(tuple)
    ),
    sm.GetHosts: st.builds(sm.GetHosts, st.lists(hostnames, max_size=20).map(tuple)),
    sm.Hosts: st.builds(sm.Hosts, host_entries),
    sm.ProbeListen: st.just(sm.ProbeListen()),
    sm.ProbeListening: st.builds(sm.ProbeListening, st.integers(0, 65535)),
    fw.OpenSessionRequest: st.builds(
        fw.OpenSessionRequest,
        st.sampled_from(fw.METHODS),
        ports,
        st.lists(targets, min_size=1, max_size=8).map(tuple),
        target_tuples,
        owners,
        owners,
        st.booleans(),
        st.lists(addresses, max_size=MAX_NAMESERVERS).map(tuple),
    ),
    fw.OpenSessionAnswer: st.builds(
        fw.OpenSessionAnswer, session_ids, leases, st.sampled_from(fw.APPLIED_METHODS)
    ),
    fw.HeartbeatRequest: st.builds(fw.HeartbeatRequest, session_ids),
    fw.HeartbeatAnswer: st.builds(fw.HeartbeatAnswer),
    fw.CloseSessionRequest: st.builds(fw.CloseSessionRequest, session_ids),
    fw.CloseSessionAnswer: st.builds(fw.CloseSessionAnswer),
    fw.SocketsRequest: st.builds(fw.SocketsRequest, session_ids),
    fw.SocketsAnswer: st.builds(fw.SocketsAnswer, session_ids, socket_paths, ports),
    fw.ReplySocketRequest: st.one_of(
        st.builds(fw.ReplySocketRequest, session_ids, v4_addresses, ports, v4_addresses, ports),
        st.builds(fw.ReplySocketRequest, session_ids, v6_addresses, ports, v6_addresses, ports),
    ),
    fw.ReplySocketAnswer: st.builds(fw.ReplySocketAnswer, session_ids, socket_paths),
    fw.SocketsHandover: st.builds(fw.SocketsHandover, kind_tuples),
    fw.SetHostsRequest: st.builds(fw.SetHostsRequest, session_ids, host_entries),
    fw.SetHostsAnswer: st.builds(fw.SetHostsAnswer, st.integers(0, fw.MAX_HOSTS)),
    fw.ListSessionsRequest: st.builds(fw.ListSessionsRequest),
    fw.ListSessionsAnswer: st.builds(
        fw.ListSessionsAnswer, st.lists(session_entries, max_size=8).map(tuple)
    ),
    fw.UpdateSessionRequest: st.builds(
        fw.UpdateSessionRequest,
        session_ids,
        st.lists(targets, min_size=1, max_size=8).map(tuple),
        target_tuples,
    ),
    fw.UpdateSessionAnswer: st.builds(fw.UpdateSessionAnswer, st.integers(0, fw.MAX_RULES)),
    fw.BypassSocketRequest: st.builds(
        fw.BypassSocketRequest, session_ids, st.sampled_from(fw.BYPASS_KINDS)
    ),
    fw.BypassSocketAnswer: st.builds(fw.BypassSocketAnswer, session_ids, socket_paths),
    fw.SetShortcutsRequest: st.builds(
        fw.SetShortcutsRequest,
        session_ids,
        shortcuts,
        st.integers(1, fw.MAX_SHORTCUT_LIMIT),
    ),
    fw.SetShortcutsAnswer: st.builds(fw.SetShortcutsAnswer, st.integers(0, fw.MAX_RULES)),
    fw.ErrorAnswer: st.builds(fw.ErrorAnswer, st.text(max_size=2000)),
    cm.StatusRequest: st.builds(cm.StatusRequest),
    cm.StatusAnswer: st.integers(1, cm.MAX_STREAMS).flatmap(
        lambda streams: st.builds(
            cm.StatusAnswer,
            st.sampled_from(cm.STATES),
            st.text(max_size=100),
            st.sampled_from(("", *fw.APPLIED_METHODS)),
            st.integers(1, 2**31 - 1),
            _seconds,
            counts,
            st.integers(0, streams),
            st.just(streams),
            counts,
            counts,
            counts,
            counts,
            st.sampled_from(cm.TCP_PATHS),
            shortcuts,
        )
    ),
    cm.ConnectionsRequest: st.builds(cm.ConnectionsRequest),
    cm.ConnectionsAnswer: st.lists(connections, max_size=8).flatmap(
        lambda found: st.builds(
            cm.ConnectionsAnswer, st.just(tuple(found)), st.integers(len(found), 10**6)
        )
    ),
    cm.RoutesRequest: st.builds(cm.RoutesRequest),
    cm.RoutesAnswer: st.builds(
        cm.RoutesAnswer,
        target_tuples,
        target_tuples,
        st.lists(addresses, max_size=MAX_NAMESERVERS).map(tuple),
    ),
    cm.AddRoutesRequest: st.builds(
        cm.AddRoutesRequest, st.lists(targets, min_size=1, max_size=8).map(tuple), target_tuples
    ),
    cm.AddRoutesAnswer: st.builds(cm.AddRoutesAnswer, target_tuples, target_tuples),
    cm.RemoveRoutesRequest: st.builds(
        cm.RemoveRoutesRequest, target_tuples, st.lists(targets, min_size=1, max_size=8).map(tuple)
    ),
    cm.RemoveRoutesAnswer: st.builds(cm.RemoveRoutesAnswer, target_tuples, target_tuples),
    cm.HostsRequest: st.builds(cm.HostsRequest),
    cm.HostsAnswer: st.builds(cm.HostsAnswer, host_entries),
    cm.StopRequest: st.builds(cm.StopRequest),
    cm.StopAnswer: st.builds(cm.StopAnswer),
    cm.ControlError: st.builds(cm.ControlError, st.text(max_size=2000)),
    cm.Connected: st.builds(cm.Connected, streams, st.text(max_size=100)),
    cm.Disconnected: st.builds(cm.Disconnected, streams, st.text(max_size=cm.MAX_REASON)),
    cm.Reconnecting: st.builds(
        cm.Reconnecting, streams, st.integers(1, 10**6), st.floats(0, 3600, allow_nan=False)
    ),
    cm.ChannelOpened: st.builds(lambda entry: cm.ChannelOpened(*entry[:6]), connections),
    cm.ChannelClosed: st.builds(cm.ChannelClosed, channels, streams, counts, counts),
    cm.FirewallLost: st.builds(cm.FirewallLost, st.text(max_size=cm.MAX_REASON)),
    cm.FirewallBack: st.builds(
        cm.FirewallBack, st.sampled_from(fw.APPLIED_METHODS), st.integers(1, 65535)
    ),
}


def _any_message(tag: int) -> st.SearchStrategy[Message]:
    return STRATEGIES[REGISTRY[tag]]


# Registered classes without a strategy fail loudly here (KeyError) instead of being skipped.
messages: st.SearchStrategy[Message] = st.sampled_from(sorted(REGISTRY)).flatmap(_any_message)
stream_messages: st.SearchStrategy[Message] = st.sampled_from(
    sorted(t for t in REGISTRY if t in STREAM_TAGS)
).flatmap(_any_message)
frame_messages: st.SearchStrategy[Message] = st.sampled_from(
    sorted(t for t in REGISTRY if t in FRAME_TAGS)
).flatmap(_any_message)

# Small messages, for tests that loop over every byte of an encoding.
SMALL_STREAM: List[st.SearchStrategy[Message]] = [
    st.builds(sm.Data, channels, st.binary(max_size=40)),
    st.builds(sm.Credit, channels, st.integers(1, sm.MAX_CREDIT)),
    st.builds(sm.Eof, channels),
    st.builds(sm.Close, channels, st.text(max_size=10)),
    st.builds(sm.Open, channels, st.text(max_size=20), st.integers(1, 65535)),
    st.builds(sm.Ping, st.integers(0, 2**63 - 1)),
    st.builds(sm.Hello, st.integers(0, 2**31), text_tuples(3, 8), st.text(max_size=10)),
    st.builds(sm.UdpOpen, channels, st.text(max_size=20), ports),
    st.builds(sm.Datagram, channels, st.binary(max_size=40)),
]
small_messages = st.one_of(SMALL_STREAM)

# -- one valid example per class, and values each field must refuse ---------------------------

SESSION = "a" * 16 + "Z" * 8 + "0123456789"[:8]

SESSION_ENTRY = fw.SessionEntry(
    "0123456789ab", 1000, "nft", 12300, 2, 1, 0, 7, 1000, fw.ANY_OWNER, False, 12.5, 4.0, 3
)

CONNECTION = (7, 0, "tcp", "127.0.0.1:50000", "10.2.0.7", 443, 1200, 53_000, 3.5)

EXAMPLES: Dict[Type[Message], Message] = {
    sm.Hello: sm.Hello(1, ("tcp", "dns"), "3.11.2"),
    sm.Welcome: sm.Welcome(1, ("tcp",)),
    sm.Open: sm.Open(1, "example.org", 443),
    sm.Opened: sm.Opened(1),
    sm.Refused: sm.Refused(1, 111, "Connection refused"),
    sm.Data: sm.Data(1, b"payload"),
    sm.Credit: sm.Credit(1, 4096),
    sm.Widen: sm.Widen(1, 4096),
    sm.Pace: sm.Pace(4000),
    sm.Eof: sm.Eof(1),
    sm.Close: sm.Close(1, "reset"),
    sm.Ping: sm.Ping(7),
    sm.Pong: sm.Pong(7),
    sm.Error: sm.Error("boom"),
    sm.UdpOpen: sm.UdpOpen(2, "2001:db8::53", 53),
    sm.Datagram: sm.Datagram(2, b"\x12\x34\x01\x00"),
    sm.GetRoutes: sm.GetRoutes(),
    sm.Routes: sm.Routes(("10.2.0.0/16", "2001:db8:2::/48"), False),
    sm.GetNameservers: sm.GetNameservers(),
    sm.Nameservers: sm.Nameservers(("10.2.0.53",)),
    sm.GetHosts: sm.GetHosts(("db1", "web.corp.example")),
    sm.Hosts: sm.Hosts((("db1", "10.2.0.7"), ("web.corp.example", "2001:db8:2::80"))),
    sm.ProbeListen: sm.ProbeListen(),
    sm.ProbeListening: sm.ProbeListening(40001),
    fw.OpenSessionRequest: fw.OpenSessionRequest(
        "auto",
        12300,
        (("10.0.0.0/8", *fw.ALL_PORTS), ("2001:db8::/32", 443, 443)),
        (("10.1.0.0/16", 22, 22),),
        1000,
        fw.ANY_OWNER,
        False,
        ("10.0.0.53", "2001:db8::53"),
    ),
    fw.OpenSessionAnswer: fw.OpenSessionAnswer(SESSION, 30.0, "nft"),
    fw.HeartbeatRequest: fw.HeartbeatRequest(SESSION),
    fw.HeartbeatAnswer: fw.HeartbeatAnswer(),
    fw.CloseSessionRequest: fw.CloseSessionRequest(SESSION),
    fw.CloseSessionAnswer: fw.CloseSessionAnswer(),
    fw.SocketsRequest: fw.SocketsRequest(SESSION),
    fw.SocketsAnswer: fw.SocketsAnswer(SESSION[::-1], "/run/shuttle/firewalld.sock.fds", 41000),
    fw.ReplySocketRequest: fw.ReplySocketRequest(SESSION, "198.18.0.5", 53, "198.18.0.1", 40000),
    fw.ReplySocketAnswer: fw.ReplySocketAnswer(SESSION[::-1], "/run/shuttle/firewalld.sock.fds"),
    fw.SocketsHandover: fw.SocketsHandover(("tcp4", "udp4", "tcp6", "udp6")),
    fw.SetHostsRequest: fw.SetHostsRequest(SESSION, (("db1", "10.2.0.7"), ("db1", "2001:db8::7"))),
    fw.SetHostsAnswer: fw.SetHostsAnswer(2),
    fw.ListSessionsRequest: fw.ListSessionsRequest(),
    fw.ListSessionsAnswer: fw.ListSessionsAnswer((SESSION_ENTRY,)),
    fw.UpdateSessionRequest: fw.UpdateSessionRequest(
        SESSION, (("10.0.0.0/8", *fw.ALL_PORTS), ("2001:db8::/32", 443, 443)), ()
    ),
    fw.UpdateSessionAnswer: fw.UpdateSessionAnswer(7),
    fw.BypassSocketRequest: fw.BypassSocketRequest(SESSION, "udp4"),
    fw.BypassSocketAnswer: fw.BypassSocketAnswer(SESSION[::-1], "/run/shuttle/firewalld.sock.fds"),
    fw.SetShortcutsRequest: fw.SetShortcutsRequest(
        SESSION, (("10.1.0.2", 7007, 40123), ("2001:db8::7", 443, 40124)), 200
    ),
    fw.SetShortcutsAnswer: fw.SetShortcutsAnswer(6),
    fw.ErrorAnswer: fw.ErrorAnswer("no"),
    cm.StatusRequest: cm.StatusRequest(),
    cm.StatusAnswer: cm.StatusAnswer(
        "up",
        "alice@gw",
        "nft",
        4242,
        61.5,
        1,
        2,
        2,
        3,
        1,
        10_000,
        2_000_000,
        "ssh",
        (("10.1.0.2", 7007, 40123),),
    ),
    cm.ConnectionsRequest: cm.ConnectionsRequest(),
    cm.ConnectionsAnswer: cm.ConnectionsAnswer((CONNECTION,), 1),
    cm.RoutesRequest: cm.RoutesRequest(),
    cm.RoutesAnswer: cm.RoutesAnswer(
        (("10.0.0.0/8", *fw.ALL_PORTS),), (("10.9.0.0/16", *fw.ALL_PORTS),), ("10.0.0.53",)
    ),
    cm.AddRoutesRequest: cm.AddRoutesRequest((("10.30.0.0/16", *fw.ALL_PORTS),), ()),
    cm.AddRoutesAnswer: cm.AddRoutesAnswer((("10.30.0.0/16", *fw.ALL_PORTS),), ()),
    cm.RemoveRoutesRequest: cm.RemoveRoutesRequest((), (("10.9.0.0/16", 22, 22),)),
    cm.RemoveRoutesAnswer: cm.RemoveRoutesAnswer((("10.30.0.0/16", *fw.ALL_PORTS),), ()),
    cm.HostsRequest: cm.HostsRequest(),
    cm.HostsAnswer: cm.HostsAnswer((("db1", "10.2.0.7"),)),
    cm.StopRequest: cm.StopRequest(),
    cm.StopAnswer: cm.StopAnswer(),
    cm.ControlError: cm.ControlError("not in the routes"),
    cm.Connected: cm.Connected(0, "alice@gw"),
    cm.Disconnected: cm.Disconnected(1, "agent closed the connection"),
    cm.Reconnecting: cm.Reconnecting(1, 3, 4.0),
    cm.ChannelOpened: cm.ChannelOpened(7, 0, "tcp", "127.0.0.1:50000", "10.2.0.7", 443),
    cm.ChannelClosed: cm.ChannelClosed(7, 0, 1200, 53_000),
    cm.FirewallLost: cm.FirewallLost("shuttle-firewalld dropped the connection"),
    cm.FirewallBack: cm.FirewallBack("nft", 40213),
}

WRONG_TYPES: List[Any] = [None, 1.5, b"x", "x", (), [], {}]


def bad_ints(low: int, high: int) -> List[Any]:
    """Values an integer field in [low, high] must refuse."""
    return [
        True,
        False,
        low - 1,
        high + 1,
        float(low),
        str(low),
        None,
        b"\x01",
        (low,),
        [low],
        10**5000,  # too long even to print with Python's default int-to-str limit
    ]


def bad_texts(max_len: int) -> List[Any]:
    return [b"text", bytearray(b"text"), None, 1, ("a",), ["a"], "x" * (max_len + 1)]


def bad_text_tuples(max_items: int, max_len: int = 64) -> List[Any]:
    return [
        ["a"],  # a list where a tuple is due
        "abc",
        b"abc",
        None,
        1,
        (1,),
        (b"x",),
        (None,),
        ("x" * (max_len + 1),),
        ("a",) * (max_items + 1),
    ]


# Network texts check_network must refuse, each alone.
BAD_NETWORK_TEXTS: List[Any] = [
    "10.0.0.1/8",  # host bits set
    "10.0.0.0/33",
    "10.0.0.0/255.0.0.0",
    "10.0.0.0",  # a network is written with its prefix
    "10.0.0.0/08",
    "010.0.0.0/8",
    " 10.0.0.0/8",
    "10.0.0.0/8 ",
    "10.0.0.0/8\n",
    "2001:DB8::/32",
    "2001:0db8::/32",
    "2001:db8:0:0:0:0:0:0/32",
    "fe80::%eth0/64",  # a scope id: arbitrary text inside a "network"
    "::%a b\nc/128",
    "",
    "banana",
    "1" * 65,  # over the length limit, checked before parsing
    b"10.0.0.0/8",
    None,
    1,
    ("10.0.0.0/8",),
]


def _with_port(position: int, value: Any) -> fw.Target:
    target: List[Any] = ["10.0.0.0/8", *fw.ALL_PORTS]
    target[position] = value
    return tuple(target)  # type: ignore[return-value]


BAD_TARGETS: List[Any] = [
    *[((text, *fw.ALL_PORTS),) for text in BAD_NETWORK_TEXTS],
    *[(_with_port(1, value),) for value in bad_ints(1, 65535)],
    *[(_with_port(2, value),) for value in bad_ints(1, 65535)],
    (("10.0.0.0/8", 443, 442),),  # first > last
    (("10.0.0.0/8", 65535, 1),),
    (("10.0.0.0/8", True, True),),  # bools are no ports
    (("10.0.0.0/8", 1),),  # a list of 2
    (("10.0.0.0/8", 1, 2, 3),),
    (("10.0.0.0/8",),),
    ((),),
    ("10.0.0.0/8",),  # a bare network, no tuple
    (["10.0.0.0/8", 1, 65535],),  # a list where a tuple is due
    (None,),
    ((None, 1, 65535),),
    (("10.0.0.0/8", *fw.ALL_PORTS), ("10.0.0.0/8", 0, 65535)),  # the second is bad
    [("10.0.0.0/8", *fw.ALL_PORTS)],
    "10.0.0.0/8",
    ("10.0.0.0/8", 1, 65535),  # one target where a tuple of them is due
    None,
    (("1.0.0.0/8", *fw.ALL_PORTS),) * (fw.MAX_SUBNETS + 1),
]

BAD_SESSIONS: List[Any] = [
    "a" * 31,
    "a" * 33,
    "a" * 31 + "-",
    "a" * 31 + " ",
    "\u00e9" * 32,  # alphanumeric to str.isalnum, but no token
    "\u00b2" * 32,
    b"a" * 32,
    None,
    1,
    ("a" * 32,),
]

# Address texts check_address must refuse, each alone.
BAD_ADDRESS_TEXTS: List[Any] = [
    "10.0.0.0/8",  # a network
    "10.0.0.1/32",
    "010.0.0.1",
    "10.0.0.256",
    " 10.0.0.1",
    "10.0.0.1\n",
    "2001:DB8::1",
    "2001:0db8::1",
    "fe80::1%eth0",  # a scope id
    "",
    "localhost",
    "1" * (MAX_ADDRESS + 1),
    b"10.0.0.1",
    None,
    167772161,  # 10.0.0.1 as a number
    ("10.0.0.1",),
]

BAD_PATHS: List[Any] = [
    "relative.sock",
    "",
    "/" + "x" * fw.MAX_PATH,
    "/a\0b",
    "/" + "\u00e9" * 60,  # 60 characters, 121 bytes
    b"/run/x",
    None,
    1,
    ("/run/x",),
]

BAD_KINDS: List[Any] = [
    (),
    ("tcp4",) * 2,
    ("tcp4", "udp4", "tcp6", "udp6", "reply"),
    ("TCP4",),
    ("tcp",),
    ("",),
    (b"tcp4",),
    (None,),
    ((),),
    ("tcp4", ["udp4"]),
    ["tcp4"],
    "tcp4",
    None,
]

BAD_LEASES: List[Any] = [
    0,
    0.0,
    0.09,
    3600.5,
    3601,
    -1.0,
    True,
    "60",
    None,
    float("nan"),
    float("inf"),
    float("-inf"),
    10**5000,
]

BAD_OWNERS = bad_ints(fw.ANY_OWNER, fw.MAX_ID)  # includes -2 and 2**32 - 1, (uid_t)-1

# Only True and False: 1 and 0 are ints on the wire, and so is anything else truthy.
BAD_BOOLS: List[Any] = [1, 0, -1, 1.0, 0.0, "true", "", b"\x01", None, (), (True,), [True]]

CHANNEL = bad_ints(1, sm.MAX_CHANNEL)

# Names that must never reach /etc/hosts: each is refused alone.
BAD_HOSTNAMES: List[Any] = [
    "",
    "-db",
    "db-",
    "db..corp",
    ".db",
    "db.",
    "db_1",
    "db 1",
    "db\n10.0.0.1 evil",
    "db\t",
    "db#x",
    "1.2.3.4",
    "db.123",
    "\u00e9cole",
    "a" * 64,
    ".".join(["a" * 63] * 4),  # 255 characters
    b"db",
    None,
    1,
    ("db",),
]


def bad_lists(good_item: Any, bad_items: List[Any], max_items: int) -> List[Any]:
    """Values a tuple-of-items field must refuse: wrong types, too long, one bad item."""
    return [None, "x", [good_item], (good_item,) * (max_items + 1)] + [
        (good_item, bad) for bad in bad_items
    ]


BAD_HOST_ITEMS: List[Any] = [
    ("db1",),
    ("db1", "10.0.0.7", "x"),
    ["db1", "10.0.0.7"],
    "db1 10.0.0.7",
    *((name, "10.0.0.7") for name in BAD_HOSTNAMES),
    *(("db1", address) for address in BAD_ADDRESS_TEXTS),
]


BAD_SHORTCUTS: List[Any] = [
    ("10.1.0.2", 7007),
    ("10.1.0.2", 7007, 40123, 1),
    ["10.1.0.2", 7007, 40123],
    "10.1.0.2 7007 40123",
    *((address, 7007, 40123) for address in BAD_ADDRESS_TEXTS),
    *(("10.1.0.2", port, 40123) for port in bad_ints(1, 65535)),
    *(("10.1.0.2", 7007, port) for port in bad_ints(1, 65535)),
    ("10.1.0.2", 7007, 40124),  # beside the good item: the same (address, port) twice
]


def _entry_with(field: str, value: Any) -> Tuple[Any, ...]:
    """The example entry, as a plain tuple, with one field replaced."""
    return tuple(value if name == field else old for name, old in SESSION_ENTRY._asdict().items())


# A bad session entry: of another length, or with one bad field.
BAD_ENTRIES: List[Any] = [
    SESSION_ENTRY[:-1],
    (*SESSION_ENTRY, 0),
    list(SESSION_ENTRY),
    *(
        _entry_with(field, value)
        for field, values in {
            "session": ["0123456789a", "0123456789abc", "0123456789a-", "0123456789a\u00e9", 1],
            "caller": bad_ints(0, fw.MAX_ID),
            "method": ["auto", "NFT", None],
            "port": bad_ints(1, 65535),
            "subnets": bad_ints(0, fw.MAX_SUBNETS),
            "excludes": bad_ints(0, fw.MAX_SUBNETS),
            "nameservers": bad_ints(0, MAX_NAMESERVERS),
            "rules": bad_ints(0, fw.MAX_RULES),
            "uid": BAD_OWNERS,
            "gid": BAD_OWNERS,
            "forward": BAD_BOOLS,
            "opened": [-0.5, math.nan, math.inf, fw.MAX_SECONDS * 2, True, "1", None],
            "lease": [-0.5, math.nan, 3600.5, True, "1", None],
            "hosts": bad_ints(0, fw.MAX_HOSTS),
        }.items()
        for value in values
    ),
]

BAD_STREAMS = bad_ints(0, cm.MAX_STREAMS - 1)
BAD_SECONDS: List[Any] = [-0.5, math.nan, math.inf, cm.MAX_SECONDS * 2, True, "1", None]


def _connection_with(index: int, value: Any) -> Tuple[Any, ...]:
    return (*CONNECTION[:index], value, *CONNECTION[index + 1 :])


# A connection entry is refused for one bad field, a wrong length or a wrong type.
BAD_CONNECTIONS: List[Any] = [
    CONNECTION[:8],
    (*CONNECTION, 0),
    list(CONNECTION),
    *(
        _connection_with(index, value)
        for index, values in enumerate(
            [
                bad_ints(1, cm.MAX_COUNT),
                BAD_STREAMS,
                ["TCP", "", None],
                bad_texts(cm.MAX_ENDPOINT),
                bad_texts(cm.MAX_HOST),
                bad_ints(1, 65535),
                bad_ints(0, cm.MAX_COUNT),
                bad_ints(0, cm.MAX_COUNT),
                BAD_SECONDS,
            ]
        )
        for value in values
    ),
]

BAD_VALUES: Dict[Type[Message], Dict[str, List[Any]]] = {
    sm.Hello: {
        "version": bad_ints(0, 2**31),
        "capabilities": bad_text_tuples(64),
        "python": bad_texts(200),
    },
    sm.Welcome: {"version": bad_ints(0, 2**31), "capabilities": bad_text_tuples(64)},
    sm.Open: {"channel": CHANNEL, "host": bad_texts(255), "port": bad_ints(1, 65535)},
    sm.Opened: {"channel": CHANNEL},
    sm.Refused: {"channel": CHANNEL, "errno": bad_ints(0, 4095), "reason": bad_texts(200)},
    sm.Data: {
        "channel": CHANNEL,
        "payload": [
            "text",
            bytearray(b"x"),
            memoryview(b"x"),
            None,
            1,
            (1, 2),
            b"x" * (sm.MAX_DATA + 1),
        ],
    },
    sm.Credit: {"channel": CHANNEL, "n": bad_ints(1, sm.MAX_CREDIT)},
    sm.Widen: {"channel": CHANNEL, "n": bad_ints(1, sm.MAX_CREDIT)},
    sm.Pace: {"floor_us": bad_ints(sm.MIN_FLOOR_US, sm.MAX_FLOOR_US)},
    sm.Eof: {"channel": CHANNEL},
    sm.Close: {"channel": CHANNEL, "reason": bad_texts(200)},
    sm.Ping: {"cookie": bad_ints(0, 2**63 - 1)},
    sm.Pong: {"cookie": bad_ints(0, 2**63 - 1)},
    sm.Error: {"text": bad_texts(1000)},
    sm.UdpOpen: {"channel": CHANNEL, "host": bad_texts(255), "port": bad_ints(1, 65535)},
    sm.Datagram: {
        "channel": CHANNEL,
        "payload": [
            "text",
            bytearray(b"x"),
            memoryview(b"x"),
            None,
            1,
            (1, 2),
            b"x" * (sm.MAX_DATAGRAM + 1),
        ],
    },
    sm.GetRoutes: {},
    sm.Routes: {
        "networks": bad_lists("10.0.0.0/8", BAD_NETWORK_TEXTS, sm.MAX_LIST),
        "more": BAD_BOOLS,
    },
    sm.GetNameservers: {},
    sm.Nameservers: {"addresses": bad_lists("10.0.0.53", BAD_ADDRESS_TEXTS, MAX_NAMESERVERS)},
    sm.GetHosts: {"seeds": bad_lists("db1", BAD_HOSTNAMES, sm.MAX_LIST)},
    sm.Hosts: {"entries": bad_lists(("db1", "10.0.0.7"), BAD_HOST_ITEMS, sm.MAX_LIST)},
    sm.ProbeListen: {},
    sm.ProbeListening: {"port": bad_ints(0, 65535)},
    fw.OpenSessionRequest: {
        "method": ["TPROXY", "NAT", "Auto", "nat ", "", b"nat", None, 1, True, ("nat",)],
        "port": bad_ints(1, 65535),
        "subnets": [*BAD_TARGETS, ()],  # at least one subnet
        "excludes": BAD_TARGETS,
        "uid": BAD_OWNERS,
        "gid": BAD_OWNERS,
        "forward": BAD_BOOLS,
        "dns": bad_lists("10.0.0.53", BAD_ADDRESS_TEXTS, MAX_NAMESERVERS),
    },
    fw.OpenSessionAnswer: {
        "session": BAD_SESSIONS,
        "lease": BAD_LEASES,
        # The answer names the method applied: "auto" is a request, never an answer.
        "method": ["auto", "Tproxy", "NFT", "nft ", "", b"nft", None, 1, ("nft",)],
    },
    fw.HeartbeatRequest: {"session": BAD_SESSIONS},
    fw.HeartbeatAnswer: {},
    fw.CloseSessionRequest: {"session": BAD_SESSIONS},
    fw.CloseSessionAnswer: {},
    fw.SocketsRequest: {"session": BAD_SESSIONS},
    fw.SocketsAnswer: {"token": BAD_SESSIONS, "path": BAD_PATHS, "port": bad_ints(1, 65535)},
    fw.ReplySocketRequest: {
        "session": BAD_SESSIONS,
        "address": [*BAD_ADDRESS_TEXTS, "fd00:5e::5"],  # not the program's IP version
        "port": bad_ints(1, 65535),
        "program_address": [*BAD_ADDRESS_TEXTS, "fd00:5e::1"],
        "program_port": bad_ints(1, 65535),
    },
    fw.ReplySocketAnswer: {"token": BAD_SESSIONS, "path": BAD_PATHS},
    fw.SocketsHandover: {"kinds": BAD_KINDS},
    fw.SetHostsRequest: {
        "session": BAD_SESSIONS,
        "hosts": bad_lists(("db1", "10.0.0.7"), BAD_HOST_ITEMS, fw.MAX_HOSTS),
    },
    fw.SetHostsAnswer: {"count": bad_ints(0, fw.MAX_HOSTS)},
    fw.ListSessionsRequest: {},
    fw.ListSessionsAnswer: {
        "sessions": bad_lists(SESSION_ENTRY, BAD_ENTRIES, fw.MAX_SESSIONS),
    },
    fw.UpdateSessionRequest: {
        "session": BAD_SESSIONS,
        "subnets": [*BAD_TARGETS, ()],  # at least one subnet
        "excludes": BAD_TARGETS,
    },
    fw.UpdateSessionAnswer: {"rules": bad_ints(0, fw.MAX_RULES)},
    fw.BypassSocketRequest: {
        "session": BAD_SESSIONS,
        "kind": ["reply", "UDP4", "udp", "", b"udp4", None, 4, ("udp4",)],
    },
    fw.BypassSocketAnswer: {"token": BAD_SESSIONS, "path": BAD_PATHS},
    fw.SetShortcutsRequest: {
        "session": BAD_SESSIONS,
        "shortcuts": bad_lists(("10.1.0.2", 7007, 40123), BAD_SHORTCUTS, fw.MAX_SHORTCUTS),
        "limit": bad_ints(1, fw.MAX_SHORTCUT_LIMIT),
    },
    fw.SetShortcutsAnswer: {"rules": bad_ints(0, fw.MAX_RULES)},
    fw.ErrorAnswer: {"text": bad_texts(2000)},
    cm.StatusRequest: {},
    cm.StatusAnswer: {
        "state": ["UP", "down", "", None, 1, ("up",)],
        "remote": bad_texts(1000),
        "method": bad_texts(16),
        "pid": bad_ints(1, 2**31 - 1),
        "uptime": BAD_SECONDS,
        "reconnects": bad_ints(0, cm.MAX_COUNT),
        "streams_up": bad_ints(0, 2),  # the example has 2 streams
        "streams": bad_ints(2, cm.MAX_STREAMS),  # fewer than the 2 up is bad too
        "channels": bad_ints(0, cm.MAX_COUNT),
        "flows": bad_ints(0, cm.MAX_COUNT),
        "bytes_up": bad_ints(0, cm.MAX_COUNT),
        "bytes_down": bad_ints(0, cm.MAX_COUNT),
        "tcp": ["SSH", "", None, 1, ("ssh",)],
        "shortcuts": bad_lists(("10.1.0.2", 7007, 40123), BAD_SHORTCUTS, fw.MAX_SHORTCUTS),
    },
    cm.ConnectionsRequest: {},
    cm.ConnectionsAnswer: {
        "connections": bad_lists(CONNECTION, BAD_CONNECTIONS, cm.MAX_CONNECTIONS),
        "total": bad_ints(1, cm.MAX_COUNT),  # at least as many as listed
    },
    cm.RoutesRequest: {},
    cm.RoutesAnswer: {
        "subnets": BAD_TARGETS,
        "excludes": BAD_TARGETS,
        "dns": bad_lists("10.0.0.53", BAD_ADDRESS_TEXTS, MAX_NAMESERVERS),
    },
    cm.AddRoutesRequest: {"subnets": BAD_TARGETS, "excludes": BAD_TARGETS},
    cm.AddRoutesAnswer: {"subnets": BAD_TARGETS, "excludes": BAD_TARGETS},
    cm.RemoveRoutesRequest: {"subnets": BAD_TARGETS, "excludes": [*BAD_TARGETS, ()]},
    cm.RemoveRoutesAnswer: {"subnets": BAD_TARGETS, "excludes": BAD_TARGETS},
    cm.HostsRequest: {},
    cm.HostsAnswer: {"hosts": bad_lists(("db1", "10.0.0.7"), BAD_HOST_ITEMS, fw.MAX_HOSTS)},
    cm.StopRequest: {},
    cm.StopAnswer: {},
    cm.ControlError: {"text": bad_texts(2000)},
    cm.Connected: {"stream": BAD_STREAMS, "remote": bad_texts(1000)},
    cm.Disconnected: {"stream": BAD_STREAMS, "reason": bad_texts(cm.MAX_REASON)},
    cm.Reconnecting: {
        "stream": BAD_STREAMS,
        "attempt": bad_ints(1, cm.MAX_COUNT),
        "delay": [-0.5, math.nan, math.inf, 3600.5, True, "1", None],
    },
    cm.ChannelOpened: {
        "channel": bad_ints(1, cm.MAX_COUNT),
        "stream": BAD_STREAMS,
        "proto": ["TCP", "sctp", "", None, 1],
        "source": bad_texts(cm.MAX_ENDPOINT),
        "host": bad_texts(cm.MAX_HOST),
        "port": bad_ints(1, 65535),
    },
    cm.ChannelClosed: {
        "channel": bad_ints(1, cm.MAX_COUNT),
        "stream": BAD_STREAMS,
        "bytes_up": bad_ints(0, cm.MAX_COUNT),
        "bytes_down": bad_ints(0, cm.MAX_COUNT),
    },
    cm.FirewallLost: {"reason": bad_texts(cm.MAX_REASON)},
    cm.FirewallBack: {"method": ["auto", "NFT", "", None, 1], "port": bad_ints(1, 65535)},
}


def bad_cases() -> List[Tuple[Type[Message], str, Any]]:
    """(class, field, bad value) for every field of every class in BAD_VALUES."""
    cases = []
    for cls, fields in BAD_VALUES.items():
        for field, values in fields.items():
            for value in values:
                cases.append((cls, field, value))
    return cases


def replace_field(cls: Type[Message], field: str, value: Any) -> Tuple[Any, ...]:
    """The example's fields with one of them replaced."""
    fields = list(wire_fields(EXAMPLES[cls]))
    fields[cls.FIELDS.index(field)] = value
    return tuple(fields)


def show(value: Any) -> str:
    """A short test id for any value (repr of a huge int raises ValueError), the same in every
    process: the parallel workers (pytest -n) must collect the same ids, so no address."""
    try:
        shown = re.sub(r" at 0x[0-9a-f]+", "", repr(value))
    except ValueError:
        return "huge-int"
    if len(shown) > 30:
        size = len(value) if hasattr(value, "__len__") else "?"
        return f"{type(value).__name__}[{size}]"
    return shown


def case_id(case: Tuple[Type[Message], str, Any]) -> str:
    cls, field, value = case
    return f"{cls.__name__}.{field}={show(value)}"

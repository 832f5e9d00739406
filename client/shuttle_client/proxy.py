"""The local side: the listener that redirected connections land on, one channel each."""

import asyncio
import errno
import logging
import resource
import socket
import struct
import time
from typing import Any, Callable, List, Optional, Protocol, Sequence, Tuple, cast

from shuttle_ends.relay import Link, Relay
from shuttle_protocol.control_messages import Connection

from .logs import Throttle
from .targets import endpoint

log = logging.getLogger("shuttle")

# SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and IP6T_SO_ORIGINAL_DST (netfilter_ipv6/
# ip6_tables.h) share the number; the socket module exports neither.
SO_ORIGINAL_DST = 80
LISTEN_BACKLOG = 4096
ACCEPT_BATCH = 256  # connections asyncio accepts per wakeup of a listener
# Binding the second family to the first one's port can lose a race with another program.
BIND_ATTEMPTS = 20
# What binding ::1 says on a host without IPv6.
UNSUPPORTED_FAMILY = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
# Descriptors kept free of captured connections, below the open-file limit, for the ssh
# pipes of reconnects, zmq, the control socket, DNS and UDP sockets (see GuardedListener).
SPARE_FDS = 64
# At most one "too many connections" line per this many seconds, with a count.
LIMIT_LOG_INTERVAL = 10.0


def make_listener(host: str, port: int) -> socket.socket:
    """One TCP socket that firewall rules redirect to; OSError if it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # v6 only, so that sock.family tells the family of every accepted connection:
            # a dual-stack socket would hand us IPv4 peers as ::ffff:a.b.c.d.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def make_listeners(addresses: Sequence[Tuple[str, int]]) -> List[socket.socket]:
    """Listeners on every address, all on one port (firewalld redirects to one port)."""
    for _ in range(BIND_ATTEMPTS):
        listeners: List[socket.socket] = []
        try:
            port = addresses[0][1]
            for host, _ in addresses:
                try:
                    listeners.append(make_listener(host, port))
                except OSError as exc:
                    if not listeners or exc.errno not in UNSUPPORTED_FAMILY:
                        raise
                    log.warning(
                        "not listening on %s (%s): that family is not captured", host, exc.strerror
                    )
                port = listeners[0].getsockname()[1]
            return listeners
        except OSError as exc:
            for sock in listeners:
                sock.close()
            if exc.errno != errno.EADDRINUSE or not listeners or addresses[0][1]:
                raise
    raise OSError(errno.EADDRINUSE, "no port free on every listen address")


def original_destination(sock: socket.socket) -> Tuple[str, int]:
    """Where the program meant to connect before REDIRECT rewrote it."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, packed = struct.unpack_from("!2xH4x16s", raw)
        return socket.inet_ntop(socket.AF_INET6, packed), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def local_address(sock: socket.socket) -> Tuple[str, int]:
    """The destination of a TPROXY'd connection: TPROXY leaves it as the socket's address."""
    host, port = sock.getsockname()[:2]
    return str(host), int(port)


Destination = Callable[[socket.socket], Tuple[str, int]]
# Takes a just-accepted connection elsewhere (the fast path) given its listener's address and
# how to find its destination; False leaves it to the agent's path here.
Take = Callable[[socket.socket, Destination], bool]


class Tunnels(Protocol):
    """What captured connections need from the client's streams (streams.Streams)."""

    def pick(self) -> Optional[Link]:
        """The link for a new channel; None while no stream is up."""

    def hold(self, waiting: "Waiting") -> bool:
        """Keep a connection until a stream is up; False if it cannot wait."""

    def release(self, waiting: "Waiting") -> None:
        """A held connection is done waiting."""

    def index(self, link: Link) -> int:
        """The stream a link belongs to."""

    def on_channel_opened(self, relay: "Incoming") -> None: ...

    def on_channel_closed(self, relay: "Incoming") -> None: ...


def _abort(transport: asyncio.BaseTransport) -> None:
    """Close with a RST, so the local program sees a reset, not an EOF."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger with a zero timeout makes close() send RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()  # type: ignore[attr-defined]


def connection_cap() -> int:
    """Captured connections get descriptors below this number (see GuardedListener)."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # one cheap system call
    if limit == resource.RLIM_INFINITY:
        limit = 1 << 20
    return max(limit - SPARE_FDS, limit // 2)


class GuardedListener:
    """A listener (it wraps one) that resets, within accept() itself, each connection whose
    descriptor would come from the reserve below the open-file limit.

    Past the limit accept() fails with EMFILE, and asyncio then logs a traceback, stops
    accepting for a second and does it again, while every connection behind it hangs in
    the backlog. Checking later, in connection_made, would be too late: asyncio accepts a
    burst of up to 100 per wakeup, and a socket it accepted is closed only iterations
    after. Here the excess socket is reset and closed before the next accept(), so the
    program sees a reset at once, connections already relayed go on, and accept() keeps
    working. The kernel hands out the lowest free descriptor, so a socket numbered n means
    0..n-1 are all open: every connection admitted has a number below the cap, which bounds
    them without counting. asyncio's selector loop calls accept() on the object given to
    create_server, and everything else it calls goes to the socket inside, which the server
    closes as before (tests/integration/test_limits.py floods a client to hold it to that).
    """

    refused = Throttle(LIMIT_LOG_INTERVAL)  # all listeners together

    def __init__(
        self, sock: socket.socket, take: Optional[Callable[[socket.socket], bool]] = None
    ) -> None:
        """take: may take a connection elsewhere (True) before asyncio sees it."""
        self.sock = sock
        self.take = take

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def accept(self) -> Tuple[socket.socket, Any]:
        cap = connection_cap()
        for _ in range(LISTEN_BACKLOG):  # bounded; what is left waits for the next wakeup
            conn, address = self.sock.accept()
            if conn.fileno() < cap:
                if self.take is not None and self.take(conn):
                    continue  # asyncio never sees it, so nothing reads it before ssh does
                return conn, address
            count = self.refused.due()
            if count:
                log.warning(
                    "too many connections: reset %d new one(s); %d descriptors are open, "
                    "near the open-file limit of %d (ulimit -n)",
                    count,
                    conn.fileno() + 1,
                    resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                )
            # Linger with a zero timeout makes close() send RST instead of FIN.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
        raise BlockingIOError(errno.EAGAIN, "more connections wait: the next wakeup")


class NotCaptured(Exception):
    """A connection's original destination is none its session captures (str: why)."""


# Connections refused as NotCaptured, for their log line.
NOT_CAPTURED = Throttle(LIMIT_LOG_INTERVAL)


class Incoming(Relay):
    """A captured connection: find its destination, open a channel, then relay."""

    __slots__ = (
        "_destination",
        "host",
        "opened_at",
        "port",
        "source",
        "stream",
        "tunnels",
    )

    def __init__(self, link: Link, destination: Destination, tunnels: Tunnels) -> None:
        super().__init__(link, 0)
        self._destination = destination
        self.tunnels = tunnels
        self.stream = tunnels.index(link)  # now: the link may be replaced by a reconnect
        self.source = ""
        self.host = ""
        self.port = 0
        self.opened_at = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        self.source = endpoint(transport.get_extra_info("peername") or ("?", 0))
        try:
            host, port = self._destination(sock)
        except OSError as exc:
            log.warning("dropping a connection that was not redirected: %s", exc)
            transport.close()
            return
        except NotCaptured as exc:
            count = NOT_CAPTURED.due()
            if count:
                log.warning(
                    "reset %d connection(s) the firewall did not capture (the last: from %s "
                    "to %s), sent to the listener itself",
                    count,
                    self.source,
                    exc,
                )
            _abort(transport)
            return
        self.host, self.port = host, port
        self.channel = self.link.mux.open(host, port)
        log.debug("channel %d: %s:%d", self.channel, host, port)
        super().connection_made(transport)
        self.link.schedule_flush()
        self.tunnels.on_channel_opened(self)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        super().connection_lost(exc)
        if self.channel:
            self.tunnels.on_channel_closed(self)

    def on_opened(self) -> None:
        """The agent's connect succeeded (the program was answered by the kernel already)."""

    def on_refused(self, errno: int) -> None:
        """The agent's connect failed (errno 0: a name that did not resolve)."""
        self.reset()  # a reset is as close to "refused" as an accepted socket gets

    def describe(self, now: float, stream: int) -> Connection:
        """The connection as the control socket lists it."""
        age = max(0.0, now - self.opened_at)
        return (
            self.channel,
            stream,
            "tcp",
            self.source,
            self.host,
            self.port,
            self.bytes_out,
            self.bytes_in,
            age,
        )


# Makes the relay of a connection on the agent's path: Incoming, or one that answers a
# proxy's client once the agent's connect is known.
MakeIncoming = Callable[[Link, Destination, Tunnels], Incoming]


class Waiting(asyncio.Protocol):
    """A captured connection that came while no stream was up: not read, and not let go
    anywhere else, until a stream is up (then it becomes an Incoming) or wait seconds
    pass (then it is reset)."""

    def __init__(
        self,
        tunnels: Tunnels,
        destination: Destination,
        wait: float,
        incoming: "MakeIncoming" = Incoming,
    ) -> None:
        self.tunnels = tunnels
        self._destination = destination
        self._wait = wait
        self._incoming = incoming
        self._transport: Optional[asyncio.Transport] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._early = b""  # what was read before reading stopped

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if not self.tunnels.hold(self):
            _abort(transport)
            return
        # Not read while held: its bytes stay in the kernel's buffers, bounded by the window.
        self._transport.pause_reading()  # type: ignore[union-attr]
        self._timer = asyncio.get_running_loop().call_later(
            self._wait, self.give_up, f"no tunnel within {self._wait:g} s"
        )

    def data_received(self, data: bytes) -> None:
        # Pausing in connection_made does not stop the first read on some Pythons (3.11.2
        # adds the reader after connection_made whatever it did): keep that one read.
        self._early += data
        if self._transport is not None:
            self._transport.pause_reading()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._done()

    def attach(self, link: Link) -> None:
        """A stream is up: relay this connection through link."""
        self._done()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        incoming = self._incoming(link, self._destination, self.tunnels)
        transport.set_protocol(incoming)
        incoming.connection_made(transport)
        if transport.is_closing():
            return
        if self._early:
            incoming.data_received(self._early)
        if incoming.reading:
            transport.resume_reading()

    def give_up(self, why: str) -> None:
        """Reset the connection: the program sees the connection fail."""
        self._done()
        if self._transport is not None and not self._transport.is_closing():
            log.debug("resetting a captured connection: %s", why)
            _abort(self._transport)

    def _done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.tunnels.release(self)


class Preloaded(asyncio.Protocol):
    """Gives the relay's protocol bytes read already (past a proxy request, or a DNS query
    that had to be read to choose its way), before any byte the transport reads, then steps
    aside."""

    def __init__(self, inner: asyncio.Protocol, early: bytes) -> None:
        self.inner = inner
        self.early = early

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.set_protocol(self.inner)
        self.inner.connection_made(transport)
        if not transport.is_closing():
            self.inner.data_received(self.early)


def relay_for(
    tunnels: Tunnels,
    destination: Destination,
    wait: float,
    incoming: MakeIncoming = Incoming,
) -> asyncio.Protocol:
    """The protocol of a connection on the agent's path: through the link tunnels pick, or
    waiting up to wait seconds for one; incoming makes the relay (a proxy's answers)."""
    link = tunnels.pick()
    if link is None:
        return Waiting(tunnels, destination, wait, incoming)
    return incoming(link, destination, tunnels)


async def serve(
    tunnels: Tunnels,
    listeners: Sequence[socket.socket],
    destination: Destination,
    wait: float,
    take: Optional[Take] = None,
    *,
    relay: Callable[[Tunnels, Destination, float], asyncio.Protocol] = relay_for,
) -> List[asyncio.Server]:
    """Accept captured connections on the listeners for as long as the servers are open;
    each goes where take sends it, or else on the agent's path (relay, which may first look
    at it: split DNS)."""
    loop = asyncio.get_running_loop()
    servers = []

    def accept() -> asyncio.Protocol:
        return relay(tunnels, destination, wait)

    def divert(conn: socket.socket) -> bool:
        return take is not None and take(conn, destination)

    for listener in listeners:
        guarded = cast(socket.socket, GuardedListener(listener, divert if take else None))
        # asyncio's backlog is both how many it accepts per wakeup and what it listen()s
        # with again: its default of 100 let a burst of connections overflow the kernel's
        # queue (retransmitted SYNs, seconds each). So the queue is set back to
        # LISTEN_BACKLOG after it, and a wakeup takes ACCEPT_BATCH: thousands at once
        # would each have a task pending together, and the memory stays taken after them.
        servers.append(await loop.create_server(accept, sock=guarded, backlog=ACCEPT_BATCH))
        listener.listen(LISTEN_BACKLOG)
    return servers

"""The local side: the listener that redirected connections land on, one channel each."""

import asyncio
import errno
import logging
import socket
import struct
from typing import Callable, List, Sequence, Tuple

from shuttle_agent.relay import Link, Relay

log = logging.getLogger("shuttle")

# SO_ORIGINAL_DST (linux/netfilter_ipv4.h) and IP6T_SO_ORIGINAL_DST (netfilter_ipv6/
# ip6_tables.h) share the number; the socket module exports neither.
SO_ORIGINAL_DST = 80
LISTEN_BACKLOG = 4096
# Binding the second family to the first one's port can lose a race with another program.
BIND_ATTEMPTS = 20
# What binding ::1 says on a host without IPv6.
UNSUPPORTED_FAMILY = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


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


class Incoming(Relay):
    """A captured connection: find its destination, open a channel, then relay."""

    __slots__ = ("_destination", "_listen_address")

    def __init__(
        self, link: Link, listen_address: Tuple[str, int], destination: Destination
    ) -> None:
        super().__init__(link, 0)
        self._listen_address = listen_address
        self._destination = destination

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        try:
            host, port = self._destination(sock)
        except OSError as exc:
            log.warning("dropping a connection that was not redirected: %s", exc)
            transport.close()
            return
        if (host, port) == self._listen_address:
            # A direct connection to the listener would open a channel back to ourselves.
            transport.close()
            return
        self.channel = self.link.mux.open(host, port)
        log.debug("channel %d: %s:%d", self.channel, host, port)
        super().connection_made(transport)
        self.link.schedule_flush()


async def serve(
    pick: Callable[[], Link], listeners: Sequence[socket.socket], destination: Destination
) -> List[asyncio.Server]:
    """Accept captured connections on the listeners for as long as the servers are open;
    pick chooses the tunnel of each."""
    loop = asyncio.get_running_loop()
    servers = []
    for listener in listeners:
        address = listener.getsockname()[:2]
        servers.append(
            await loop.create_server(
                lambda address=address: Incoming(pick(), address, destination),  # type: ignore[misc]
                sock=listener,
            )
        )
    return servers

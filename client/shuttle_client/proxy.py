"""The local side: the listener that redirected connections land on, one channel each."""

import asyncio
import logging
import socket
import struct
from typing import Tuple

from shuttle_agent.relay import Link, Relay

log = logging.getLogger("shuttle")

# From linux/netfilter_ipv4.h; the socket module does not export it.
SO_ORIGINAL_DST = 80
LISTEN_BACKLOG = 4096


def make_listener(host: str, port: int) -> socket.socket:
    """The TCP socket that firewall rules redirect to; OSError if it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def original_destination(sock: socket.socket) -> Tuple[str, int]:
    """Where the program meant to connect before REDIRECT rewrote it (IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


class Incoming(Relay):
    """A redirected connection: find its destination, open a channel, then relay."""

    def __init__(self, link: Link, listen_address: Tuple[str, int]) -> None:
        super().__init__(link, 0)
        self._listen_address = listen_address

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        try:
            host, port = original_destination(sock)
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


async def serve(link: Link, listener: socket.socket) -> asyncio.Server:
    """Accept redirected connections on listener for as long as the server is open."""
    address = listener.getsockname()[:2]
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Incoming(link, address), sock=listener)

"""The proxies' asyncio driver: accept, run a parser (socks5.py, http_connect.py) over the
raw socket up to its request, then hand the connection to the paths captured connections
take (Streams.take: ssh's fast path; else the agent's channels), so it relays and is listed
the same."""

import asyncio
import errno
import logging
import os
import socket
from typing import Any, Awaitable, Callable, List, Optional, Set, Tuple

from shuttle_ends.relay import Link
from shuttle_protocol.errors import RemoteProtocolError

from shuttle_client.cli import Options
from shuttle_client.fastpath import reset
from shuttle_client.logs import Throttle
from shuttle_client.proxy import (
    LIMIT_LOG_INTERVAL,
    LISTEN_BACKLOG,
    Destination,
    Incoming,
    Preloaded,
    Tunnels,
    connection_cap,
    relay_for,
)
from shuttle_client.streams import Streams
from shuttle_client.targets import endpoint

from . import http_connect, socks5
from .peers import peer_uid
from .socks5 import NEED_DATA, Credentials
from .socks_udp import Associations

log = logging.getLogger("shuttle")

HANDSHAKE_TIMEOUT = 30.0  # seconds a client has to make its request
READ_SIZE = 16 * 1024
MAX_HANDSHAKES = 1024  # negotiating at once; more are reset (each holds a descriptor)

Address = Tuple[str, int]
# What a proxy's client is told: bytes for success (before the hand-over on ssh's fast path,
# at the agent's Opened on its path), and bytes for a failure's errno on the agent's path
# (0: a name that did not resolve).
Answer = Tuple[bytes, Callable[[int], bytes]]
# The target of a negotiated connection, what to send it first, and the answer to give;
# None when the handler has dealt with the connection itself (an error answered, or a UDP
# association).
Negotiated = Optional[Tuple[str, int, bytes, Answer]]
Handler = Callable[[socket.socket], Awaitable[Negotiated]]
# RFC 1928's reply for the errno of a failed connect; any other is a general failure.
SOCKS_REPLIES = {
    errno.ECONNREFUSED: socks5.CONNECTION_REFUSED,
    errno.EHOSTUNREACH: socks5.HOST_UNREACHABLE,
    errno.EHOSTDOWN: socks5.HOST_UNREACHABLE,
    errno.ETIMEDOUT: socks5.HOST_UNREACHABLE,
    0: socks5.HOST_UNREACHABLE,  # the name did not resolve
    errno.ENETUNREACH: socks5.NETWORK_UNREACHABLE,
    errno.EACCES: socks5.NOT_ALLOWED,
    errno.EPERM: socks5.NOT_ALLOWED,
}


class Answering(Incoming):
    """A proxied connection on the agent's path: its client hears the agent's outcome (the
    SOCKS reply, or HTTP's 200 or 502) before any byte of the target, and a refusal as its
    error code, then a close."""

    def __init__(self, link: Link, destination: Destination, tunnels: Tunnels, answer: Answer):
        super().__init__(link, destination, tunnels)
        self.answer = answer

    def on_opened(self) -> None:
        # Before any Data: the agent sends Opened first.
        if self.transport is not None and self.answer[0]:
            self.transport.write(self.answer[0])

    def on_refused(self, errno: int) -> None:
        transport = self.transport
        if transport is None:
            return
        # The channel is gone: forget it without the reset its state would command, so the
        # client reads the answer before a clean close.
        self.state.reset()
        transport.write(self.answer[1](errno))
        transport.close()


class ProxyError(Exception):
    """A proxy cannot be set up (the text is for the user)."""


def make_proxy_listener(host: str, port: int) -> socket.socket:
    """A TCP listener for a proxy; ProxyError (the user's words) if it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        raise ProxyError(f"cannot listen on {where}: {exc.strerror}") from None
    return sock


async def _receive(conn: socket.socket) -> bytes:
    """The next bytes of a negotiating client; ConnectionError at its EOF."""
    data = await asyncio.get_running_loop().sock_recv(conn, READ_SIZE)
    if not data:
        raise ConnectionResetError(errno.ECONNRESET, "closed before its request")
    return data


# Connections refused as another user's, for their log line.
OTHER_USERS = Throttle(LIMIT_LOG_INTERVAL)


class ProxyServer:
    """One proxy's listener; each accepted client is negotiated by handler. With only_uid,
    a client whose socket another uid owns (or that is not on this host) is reset first."""

    def __init__(
        self,
        streams: Streams,
        sock: socket.socket,
        kind: str,
        handler: Handler,
        only_uid: Optional[int] = None,
    ) -> None:
        self.streams = streams
        self.sock = sock
        self.kind = kind
        self.handler = handler
        self.only_uid = only_uid
        self.negotiating = 0
        self._tasks: Set[asyncio.Task[Any]] = set()
        self._accepting: Optional[asyncio.Task[None]] = None

    def start(self) -> None:
        self._accepting = asyncio.ensure_future(self._accept_loop())

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for task in list(self._tasks):
            task.cancel()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:  # EMFILE and the like: the next one may do
                log.warning("%s proxy: accept failed: %s", self.kind, exc.strerror)
                await asyncio.sleep(0.1)
                continue
            # Below the open-file cap that captured connections keep (proxy.GuardedListener).
            if conn.fileno() >= connection_cap() or self.negotiating >= MAX_HANDSHAKES:
                reset(conn)
                continue
            conn.setblocking(False)
            task = asyncio.ensure_future(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        if self.only_uid is not None and peer_uid(conn) != self.only_uid:
            count = OTHER_USERS.due()
            if count:
                log.warning(
                    "%s proxy: reset %d connection(s) of other users (the last from %s); "
                    "--socks-auth lets anyone with the password in",
                    self.kind,
                    count,
                    endpoint(conn.getpeername()),
                )
            reset(conn)
            return
        self.negotiating += 1
        try:
            negotiated = await asyncio.wait_for(self.handler(conn), HANDSHAKE_TIMEOUT)
        except (OSError, asyncio.TimeoutError, RemoteProtocolError) as exc:
            log.debug("%s proxy: client dropped: %s", self.kind, exc)
            reset(conn)
            return
        except BaseException:
            reset(conn)
            raise
        finally:
            self.negotiating -= 1
        if negotiated is None:
            return
        self.relay(conn, negotiated)

    def relay(self, conn: socket.socket, negotiated: Tuple[str, int, bytes, Answer]) -> None:
        """Relay conn to the negotiated host and port on the paths captured connections
        take. Where a master has room, its client is told "succeeded" (SOCKS5 REP 0, HTTP
        200) at once and ssh carries the connection: the master's answer comes after ssh
        may have written the target's first bytes (a server-first banner) to the socket, so
        no reply of ours can wait for it. A failed open goes on to the agent, as a captured
        connection's does, and a refusal there is a reset. ssh -D answers the same way:
        OpenSSH's channels.c, channel_decode_socks5, queues SSH_SOCKS5_SUCCESS in the
        channel's output, and only then does channel_pre_dynamic send the direct-tcpip open
        (port_open_helper); a failed open closes the socket. Elsewhere (no master up or none
        with room, --tcp=agent, a server that does not forward) the agent's path answers
        with the outcome: succeeded at its Opened, else the failure's own code. The bytes
        read past the request (an HTTP request's rewritten head, or what a client sent
        without waiting for its answer) go by the agent's path too: ssh reads the socket
        itself."""

        host, port, early, answer = negotiated

        def destination(_: socket.socket) -> Address:
            return host, port

        if not early and self.streams.take(conn, destination, answer[0]):
            return

        def answering(link: Link, found: Destination, tunnels: Tunnels) -> Incoming:
            return Answering(link, found, tunnels, answer)

        wait = self.streams.options.wait_tunnel

        def protocol() -> asyncio.Protocol:
            inner = relay_for(self.streams, destination, wait, answering)
            return Preloaded(inner, early) if early else inner

        task = asyncio.ensure_future(
            asyncio.get_running_loop().connect_accepted_socket(protocol, sock=conn)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def socks_handler(
    credentials: Optional[Credentials],
    udp: Callable[[socket.socket, socks5.Socks5Server, socks5.Request], Awaitable[None]],
) -> Handler:
    """Negotiate SOCKS5; a CONNECT is answered as ProxyServer.relay says."""

    async def negotiate(conn: socket.socket) -> Negotiated:
        loop = asyncio.get_running_loop()
        parser = socks5.Socks5Server(credentials)
        while True:
            try:
                event = parser.next_event()
            finally:
                out = parser.data_to_send()
                if out:
                    await loop.sock_sendall(conn, out)
            if event is not NEED_DATA:
                break
            parser.receive_data(await _receive(conn))
        if not isinstance(event, socks5.Request):
            raise RemoteProtocolError("no request")
        if event.command == socks5.UDP_ASSOCIATE:
            await udp(conn, parser, event)
            return None

        def failed(code: int) -> bytes:
            return parser.reply(SOCKS_REPLIES.get(code, socks5.GENERAL_FAILURE))

        return event.host, event.port, parser.trailing, (parser.reply(socks5.SUCCEEDED), failed)

    return negotiate


def http_failure(code: int) -> bytes:
    """The answer to an HTTP proxy's client whose target could not be reached."""
    if code == errno.ETIMEDOUT:
        return http_connect.HttpProxyError(504, "Gateway Timeout", os.strerror(code)).response
    why = os.strerror(code) if code else "the name did not resolve"
    return http_connect.HttpProxyError(502, "Bad Gateway", why).response


async def http_negotiate(conn: socket.socket) -> Negotiated:
    """Read one request head: CONNECT is answered as ProxyServer.relay says (on the agent's
    path 200 once the target is connected, 502, 504 for a time-out, if it is not); an
    absolute-URI request is sent on to its target as an origin-form one. A bad request gets
    its 4xx/5xx, then a close."""
    loop = asyncio.get_running_loop()
    parser = http_connect.HttpProxyServer()
    while True:
        try:
            event = parser.next_event()
        except http_connect.HttpProxyError as exc:
            await loop.sock_sendall(conn, exc.response)
            log.debug("http proxy: %s", exc)
            conn.shutdown(socket.SHUT_WR)
            conn.close()
            return None
        if event is not NEED_DATA:
            break
        parser.receive_data(await _receive(conn))
    if isinstance(event, http_connect.Connect):
        return event.host, event.port, parser.trailing, (http_connect.ESTABLISHED, http_failure)
    if isinstance(event, http_connect.Forward):
        return event.host, event.port, event.head + parser.trailing, (b"", http_failure)
    raise RemoteProtocolError("no request")


class Proxies:
    """The --socks and --http-proxy listeners, bound before the tunnel (a taken port fails
    at once), served once it is up."""

    def __init__(self, options: Options) -> None:
        """ProxyError if a listener cannot bind."""
        self.credentials = options.socks_auth
        self.listeners: List[Tuple[str, socket.socket]] = []
        try:
            for kind, address in (("socks", options.socks), ("http", options.http_proxy)):
                if address is not None:
                    self.listeners.append((kind, make_proxy_listener(*address)))
        except ProxyError:
            self.close()
            raise
        self.servers: List[ProxyServer] = []
        self.associations: Optional[Associations] = None

    def start(self, streams: Streams) -> None:
        """Serve through streams' tunnels."""
        # Without a password, the proxy is this user's alone (loopback: cli.py).
        mine = os.getuid()
        associations = Associations(streams, mine if self.credentials is None else None)
        self.associations = associations
        for kind, sock in self.listeners:
            if kind == "socks":
                handler = socks_handler(self.credentials, associations.associate)
            else:
                handler = http_negotiate
            only_uid = mine if kind == "http" or self.credentials is None else None
            server = ProxyServer(streams, sock, kind, handler, only_uid)
            server.start()
            self.servers.append(server)

    def describe(self) -> str:
        """For the ready line: 'socks5 on 127.0.0.1:1080, http proxy on ...'."""
        names = {"socks": "socks5", "http": "http proxy"}
        return ", ".join(f"{names[kind]} on {address(sock)}" for kind, sock in self.listeners)

    def close(self) -> None:
        if self.associations is not None:
            self.associations.close()
        for server in self.servers:
            server.close()
        for _, sock in self.listeners:
            sock.close()


def address(sock: socket.socket) -> str:
    """A listener's address as the user writes it."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""SOCKS5 UDP ASSOCIATE: a UDP socket per association, beside the SOCKS listener; each
destination a client's datagrams name becomes one of the agent's UDP flows, and the
association ends with its TCP connection (RFC 1928 section 7)."""

import asyncio
import ipaddress
import logging
import socket
import time
from typing import Any, Dict, Optional, Set, Tuple

from shuttle_ends.relay import Link
from shuttle_protocol.control_messages import Connection
from shuttle_protocol.errors import RemoteProtocolError
from shuttle_protocol.stream_messages import Close, Datagram

from shuttle_client.listing import udp_entry
from shuttle_client.logs import Throttle
from shuttle_client.proxy import LIMIT_LOG_INTERVAL
from shuttle_client.streams import Streams
from shuttle_client.targets import endpoint

from . import socks5
from .peers import datagram_owner

log = logging.getLogger("shuttle")

MAX_DATAGRAM = 65535
READ_BATCH = 64  # datagrams read per wake-up, so one busy client cannot starve the loop
MAX_FLOWS = 256  # destinations per association
Address = Tuple[str, int]
# Datagrams dropped as other users', for their log line.
OTHER_USERS = Throttle(LIMIT_LOG_INTERVAL)


def parse_datagram(data: bytes) -> Tuple[str, int, bytes]:
    """RSV RSV FRAG ATYP DST.ADDR DST.PORT DATA → (host, port, data); RemoteProtocolError
    for what is not one, or a fragment (not supported: RFC 1928 lets a server drop them)."""
    if len(data) < 4 or data[0] or data[1]:
        raise RemoteProtocolError("not a SOCKS5 UDP datagram")
    if data[2]:
        raise RemoteProtocolError("a fragment")
    found = socks5.decode_address(data, 3)
    if found is None:
        raise RemoteProtocolError("a truncated address")
    host, port, end = found
    if not port:
        raise RemoteProtocolError("a datagram to port 0")
    return host, port, data[end:]


class SocksFlow:
    """One association's datagrams to one destination, and the replies."""

    def __init__(
        self, association: "Association", link: Link, channel: int, destination: Address
    ) -> None:
        self.association = association
        self.link = link
        self.channel = channel
        self.destination = destination
        self.header = b"\0\0\0" + socks5.encode_address(*destination)
        self.opened_at = time.monotonic()
        self.bytes_out = 0
        self.bytes_in = 0

    @property
    def source(self) -> Address:
        return self.association.client or self.association.peer

    def describe(self, now: float, stream: int) -> Connection:
        """The flow as the control socket lists it."""
        return udp_entry(self, now, stream)

    def on_datagram(self, msg: Datagram) -> None:
        self.bytes_in += len(msg.payload)
        self.association.reply(self.header + msg.payload)

    def on_close(self, msg: Close) -> None:
        self.association.forget(self)

    def reset(self) -> None:
        self.association.forget(self)

    def close(self) -> None:
        if self.link.flows.pop(self.channel, None) is self:
            self.link.mux.close(self.channel, "association ended")
            self.link.schedule_flush()


class Association:
    """One UDP ASSOCIATE: datagrams only from the address and port the association is bound
    to (RFC 1928: the one the request states, else the TCP peer's address and the first
    datagram's port), and with only_uid, only from a socket that uid owns."""

    def __init__(
        self,
        streams: Streams,
        sock: socket.socket,
        peer: Address,
        client: Optional[Address] = None,
        only_uid: Optional[int] = None,
    ) -> None:
        self.streams = streams
        self.sock = sock
        self.peer = peer
        # The client's UDP address: its IP is the TCP peer's; the request's port, or else
        # the first datagram's.
        self.client = client
        self.only_uid = only_uid
        self.flows: Dict[Address, SocksFlow] = {}

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        for flow in list(self.flows.values()):
            flow.close()
        self.flows.clear()

    def forget(self, flow: SocksFlow) -> None:
        if self.flows.get(flow.destination) is flow:
            del self.flows[flow.destination]

    def reply(self, data: bytes) -> None:
        if self.client is None:
            return
        try:
            self.sock.sendto(data, self.client)
        except OSError as exc:  # a full buffer: UDP may drop
            log.debug("socks udp: reply dropped: %s", exc.strerror)

    def _read(self) -> None:
        for _ in range(READ_BATCH):
            try:
                data, source = self.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("socks udp: %s", exc.strerror)
                return
            source = source[:2]
            if source[0] != self.peer[0] or (self.client not in (None, source)):
                continue  # not the client that asked for this association
            if self.only_uid is not None and datagram_owner(self.sock, source) != self.only_uid:
                # Another user's socket, which took the port (or sent from it first).
                count = OTHER_USERS.due()
                if count:
                    log.warning(
                        "socks udp: dropped %d datagram(s) from other users' sockets (the "
                        "last from %s)",
                        count,
                        endpoint(source),
                    )
                continue
            try:
                host, port, payload = parse_datagram(data)
            except RemoteProtocolError as exc:
                log.debug("socks udp: dropped: %s", exc)
                continue
            self.client = source
            flow = self.flows.get((host, port)) or self._open((host, port))
            if flow is not None and flow.link.send_datagram(flow.channel, payload):
                flow.bytes_out += len(payload)

    def _open(self, destination: Address) -> Optional[SocksFlow]:
        link = self.streams.pick()
        if link is None or len(self.flows) >= MAX_FLOWS:
            return None
        channel = link.mux.open_udp(*destination)
        flow = SocksFlow(self, link, channel, destination)
        self.flows[destination] = flow
        link.flows[channel] = flow
        log.debug("socks udp channel %d: -> %s:%d", channel, *destination)
        return flow


def _stated(request: socks5.Request, peer: Address) -> Tuple[bool, Optional[Address]]:
    """(allowed, the client's UDP address): the one the request states (None: its port is
    not known yet); not allowed at another IP than the TCP peer's."""
    host, port = request.host, request.port
    try:
        unknown = ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a name
        unknown = False
    if unknown:  # all zeros: the TCP peer's
        host = peer[0]
    if host != peer[0]:
        return False, None
    return True, ((host, port) if port else None)


class Associations:
    """Every UDP association of the SOCKS listeners, for as long as its TCP connection;
    with only_uid, each datagram must come from a socket of that uid."""

    def __init__(self, streams: Streams, only_uid: Optional[int] = None) -> None:
        self.streams = streams
        self.only_uid = only_uid
        self._tasks: Set[asyncio.Task[Any]] = set()

    async def associate(
        self, conn: socket.socket, parser: socks5.Socks5Server, request: socks5.Request
    ) -> None:
        """Bind the association's socket, answer with its address; it lives on in a task.
        The request's address, if not all zeros, is where the client's datagrams come from:
        its IP must be the TCP peer's (RFC 1928 lets a server limit it so)."""
        loop = asyncio.get_running_loop()
        peer = conn.getpeername()[:2]
        allowed, client = _stated(request, peer)
        if not allowed:
            await loop.sock_sendall(conn, parser.reply(socks5.NOT_ALLOWED))
            return
        host = conn.getsockname()[0]
        sock = socket.socket(conn.family, socket.SOCK_DGRAM)
        try:
            sock.bind((host, 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            await loop.sock_sendall(conn, parser.reply(socks5.GENERAL_FAILURE))
            raise
        association = Association(self.streams, sock, peer, client, self.only_uid)
        association.start()
        try:
            await loop.sock_sendall(conn, parser.reply(socks5.SUCCEEDED, *sock.getsockname()[:2]))
        except BaseException:
            association.close()
            raise
        task = asyncio.ensure_future(self._hold(conn, association))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hold(self, conn: socket.socket, association: Association) -> None:
        loop = asyncio.get_running_loop()
        try:
            while await loop.sock_recv(conn, 4096):
                pass  # the client should send nothing more; its close ends the association
        except OSError:
            pass
        finally:
            association.close()
            conn.close()

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

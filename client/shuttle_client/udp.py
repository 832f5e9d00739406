"""UDP through tproxy: captured datagrams become flows, their replies leave from the
original destination.

firewalld hands over transparent UDP sockets; each datagram on them carries its original
destination in IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR ancillary data. One flow (one
channel) per (program address, original destination). A reply must come from the original
destination's address *and port*, which only a transparent socket bound there can do, and
only firewalld may make one: it does so per flow, on request, inside the session's subnets,
and fences it to send only to the flow's program (whose address and port it is told).
"""

import asyncio
import logging
import socket
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from shuttle_ends.relay import Link
from shuttle_protocol.control_messages import Connection
from shuttle_protocol.stream_messages import Close, Datagram

from .firewall_session import FirewallError, FirewallSession
from .listing import udp_entry
from .logs import Throttle, printable
from .proxy import LIMIT_LOG_INTERVAL
from .split_dns import SplitDns
from .targets import endpoint

log = logging.getLogger("shuttle")

# linux/in.h and linux/in6.h; the socket module exports neither.
IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
MAX_DATAGRAM = 65535
CMSG_SPACE = socket.CMSG_SPACE(28)  # room for a sockaddr_in6
READ_BATCH = 64  # datagrams read per wake-up, so one busy socket cannot starve the loop
IDLE_TIMEOUT = 60.0
MAX_FLOWS = 4096
MAX_HELD = 64  # replies kept while the flow's reply socket is on its way

Address = Tuple[str, int]
# Datagrams dropped as not captured, for their log line.
NOT_CAPTURED = Throttle(LIMIT_LOG_INTERVAL)


def original_destination(ancillary: List[Tuple[int, int, bytes]]) -> Optional[Address]:
    """The destination a datagram was sent to before TPROXY diverted it."""
    for level, kind, data in ancillary:
        if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            port, packed = struct.unpack_from("!2xH4s", data)
            return socket.inet_ntoa(packed), port
        if level == socket.IPPROTO_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            port, packed = struct.unpack_from("!2xH4x16s", data)
            return socket.inet_ntop(socket.AF_INET6, packed), port
    return None


class UdpFlow:
    """One program's datagrams to one original destination, and the replies."""

    def __init__(
        self, relay: "UdpRelay", link: Link, channel: int, source: Address, destination: Address
    ):
        self.relay = relay
        self.link = link  # the tunnel that carries this flow
        self.channel = channel
        self.source = source
        self.destination = destination
        self.last_active = self.opened_at = time.monotonic()
        self.bytes_out = 0  # datagrams' bytes from the program
        self.bytes_in = 0  # and to it
        self.reply_socket: Optional[socket.socket] = None
        self._held: List[bytes] = []
        self._closed = False

    def describe(self, now: float, stream: int) -> Connection:
        """The flow as the control socket lists it."""
        return udp_entry(self, now, stream)

    def on_datagram(self, msg: Datagram) -> None:
        self.deliver(msg.payload)

    def deliver(self, payload: bytes) -> None:
        """A reply for the program: from the tunnel, or from a local resolver (split DNS)."""
        self.last_active = time.monotonic()
        self.bytes_in += len(payload)
        if self.reply_socket is None:
            if len(self._held) < MAX_HELD:
                self._held.append(payload)
            return
        self._send(payload)

    def on_close(self, msg: Close) -> None:
        log.debug("udp channel %d closed by the agent: %s", self.channel, printable(msg.reason))
        self.release()

    def reset(self) -> None:
        self.release()

    def attach(self, reply_socket: socket.socket) -> None:
        if self._closed:
            reply_socket.close()
            return
        reply_socket.setblocking(False)
        self.reply_socket = reply_socket
        held, self._held = self._held, []
        for payload in held:
            self._send(payload)

    def release(self) -> None:
        """Forget the flow and close its reply socket."""
        self._closed = True
        self.relay.forget(self)
        if self.reply_socket is not None:
            self.reply_socket.close()
            self.reply_socket = None

    def _send(self, payload: bytes) -> None:
        if self.reply_socket is None:
            return
        try:
            self.reply_socket.sendto(payload, self.source)
        except OSError as exc:  # a full buffer or a program that went away: UDP may drop
            log.debug("udp channel %d: reply dropped: %s", self.channel, exc.strerror)


class UdpRelay:
    """The transparent UDP sockets of a tproxy session, and the flows they start."""

    def __init__(
        self,
        pick: Callable[[], Optional[Link]],
        firewall: FirewallSession,
        sockets: List[socket.socket],
        captures: Callable[[Address], bool],
        rewrite: Callable[[Address], Address] = lambda destination: destination,
    ):
        self.pick = pick  # the tunnel for a new flow
        self.firewall = firewall
        # Whether an original destination is one the session captures: a datagram sent to
        # the socket's own address (127.0.0.1:port) was not, and must not leave through the
        # tunnel towards that address on the server's side.
        self.captures = captures
        # Where a flow goes on the server's side (--dns: the server's resolver); its reply
        # socket stays at the original destination, where the program expects answers from.
        self.rewrite = rewrite
        self.sockets = sockets
        self.flows: Dict[Tuple[Address, Address], UdpFlow] = {}
        self._tasks: Set[asyncio.Task[Any]] = set()
        self.dropped = 0
        self.split: Optional[SplitDns] = None  # --dns-domains: the queries that stay local

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._read, sock)
        self._spawn(self._expire())

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        for flow in list(self.flows.values()):
            flow.release()
        for task in self._tasks:
            task.cancel()

    def forget(self, flow: UdpFlow) -> None:
        if self.flows.get((flow.source, flow.destination)) is flow:
            del self.flows[(flow.source, flow.destination)]
        if flow.link.flows.get(flow.channel) is flow:
            del flow.link.flows[flow.channel]

    def _read(self, sock: socket.socket) -> None:
        for _ in range(READ_BATCH):
            try:
                payload, ancillary, _, source = sock.recvmsg(MAX_DATAGRAM, CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("udp socket: %s", exc.strerror)
                return
            destination = original_destination(ancillary)
            if destination is None:
                continue  # not diverted by TPROXY: nobody should send here directly
            split = self.split
            if split is not None and split.udp.own(source[:2]):
                continue  # our own query, captured: never again round the loop
            flow = self.flows.get((source[:2], destination)) or self._open(source[:2], destination)
            if flow is None:
                self.dropped += 1
                continue
            flow.last_active = time.monotonic()
            if (
                split is not None
                and split.is_resolver(destination)
                and not split.domains.remote(payload)
            ):
                # Its answer leaves from the flow's reply socket, as from the resolver.
                split.udp.send(payload, destination, flow.deliver)
                continue
            if flow.link.send_datagram(flow.channel, payload):
                flow.bytes_out += len(payload)
            else:
                self.dropped += 1

    def _open(self, source: Address, destination: Address) -> Optional[UdpFlow]:
        if not self.captures(destination):
            count = NOT_CAPTURED.due()
            if count:
                log.warning(
                    "dropped %d datagram(s) the firewall did not capture (the last: from %s "
                    "to %s), sent to the UDP socket itself",
                    count,
                    endpoint(source),
                    endpoint(destination),
                )
            return None
        link = self.pick()
        if link is None or len(self.flows) >= MAX_FLOWS:  # no stream up: dropped, not sent
            return None
        channel = link.mux.open_udp(*self.rewrite(destination))
        flow = UdpFlow(self, link, channel, source, destination)
        self.flows[(source, destination)] = flow
        link.flows[channel] = flow
        log.debug("udp channel %d: %s:%d -> %s:%d", channel, *source, *destination)
        self._spawn(self._fetch_reply_socket(flow))
        return flow

    async def _fetch_reply_socket(self, flow: UdpFlow) -> None:
        try:
            reply_socket = await self.firewall.reply_socket(*flow.destination, flow.source)
        except FirewallError as exc:
            log.warning("no reply socket for %s:%d: %s", *flow.destination, exc)
            flow.link.mux.close(flow.channel, "no reply socket")
            flow.link.schedule_flush()
            flow.release()
            return
        flow.attach(reply_socket)

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(IDLE_TIMEOUT / 4)
            now = time.monotonic()
            for flow in [f for f in self.flows.values() if now - f.last_active > IDLE_TIMEOUT]:
                log.debug("udp channel %d: idle, closed", flow.channel)
                flow.link.mux.close(flow.channel, "idle")
                flow.link.schedule_flush()
                flow.release()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

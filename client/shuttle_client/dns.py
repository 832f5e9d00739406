"""--dns: captured DNS queries, answered by the server's side through the tunnel.

A captured query's destination is one of this host's resolvers, port 53; `Nameserver`
rewrites it to the server's resolver. TCP queries arrive like any captured connection and
take the rewrite in the proxy; with tproxy so do UDP queries, as UDP flows (udp.py).

With nat and nft, firewalld redirects UDP queries to our UDP sockets on the listeners' port
(`DnsRelay`). Each program socket's queries become one UDP flow to the server's resolver.
An answer goes back from the socket the query came to, and the kernel's NAT gives it the
resolver's address as its source (the reverse of the redirect), so the program accepts it.
"""

import asyncio
import logging
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from shuttle_ends.relay import Link
from shuttle_protocol.control_messages import Connection
from shuttle_protocol.stream_messages import Close, Datagram

from .listing import udp_entry
from .logs import printable
from .resolvers import DNS_PORT
from .split_dns import SplitDns, datagrams

log = logging.getLogger("shuttle")

# A resolver retries after a few seconds: a flow idle this long will not be answered.
IDLE_TIMEOUT = 30.0
MAX_FLOWS = 1024

Address = Tuple[str, int]


class Nameserver:
    """Where captured DNS goes instead: the server's resolver (with domains, only queries
    for names in those: split_dns.py)."""

    def __init__(
        self, captured: Sequence[str], server: Address, domains: Sequence[str] = ()
    ) -> None:
        self.captured = frozenset(captured)
        self.order = tuple(captured)  # as resolv.conf lists them
        self.server = server
        self.domains = tuple(domains)

    def rewrite(self, destination: Address) -> Address:
        """The destination to open on the server's side for a captured one."""
        if destination[1] == DNS_PORT and destination[0] in self.captured:
            return self.server
        return destination


def make_udp_sockets(addresses: Sequence[Address]) -> List[socket.socket]:
    """UDP sockets bound where the TCP listeners are, for redirected queries; OSError if none
    can bind (an address of a family this host lacks is skipped, as the listeners do)."""
    sockets: List[socket.socket] = []
    errors: List[OSError] = []
    for host, port in addresses:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            errors.append(exc)
            continue
        sockets.append(sock)
    if not sockets and errors:
        raise errors[0]
    return sockets


class DnsFlow:
    """One program socket's queries, and their answers."""

    def __init__(
        self, relay: "DnsRelay", link: Link, channel: int, sock: socket.socket, source: Address
    ) -> None:
        self.relay = relay
        self.link = link
        self.channel = channel
        self.sock = sock  # the socket the queries came to: answers leave from it
        self.source = source
        self.last_active = self.opened_at = time.monotonic()
        self.bytes_out = 0  # queries' bytes
        self.bytes_in = 0  # answers' bytes

    @property
    def destination(self) -> Address:
        """Where the queries go: the server's resolver."""
        return self.relay.server

    def describe(self, now: float, stream: int) -> Connection:
        """The flow as the control socket lists it."""
        return udp_entry(self, now, stream)

    def on_datagram(self, msg: Datagram) -> None:
        self.last_active = time.monotonic()
        self.bytes_in += len(msg.payload)
        try:
            self.sock.sendto(msg.payload, self.source)
        except OSError as exc:  # a full buffer or a program that went away: UDP may drop
            log.debug("dns channel %d: answer dropped: %s", self.channel, exc.strerror)

    def on_close(self, msg: Close) -> None:
        log.debug("dns channel %d closed by the agent: %s", self.channel, printable(msg.reason))
        self.relay.forget(self)

    def reset(self) -> None:
        self.relay.forget(self)


class DnsRelay:
    """Our UDP sockets for redirected queries (nat, nft), and the flows they start."""

    def __init__(
        self, pick: Callable[[], Optional[Link]], sockets: List[socket.socket], server: Address
    ) -> None:
        self.pick = pick  # the tunnel for a new flow
        self.sockets = sockets
        self.server = server
        self.flows: Dict[Tuple[int, Address], DnsFlow] = {}
        self.dropped = 0
        self.split: Optional[SplitDns] = None  # --dns-domains: the queries that stay local
        self._tasks: Set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            loop.add_reader(sock.fileno(), self._read, sock)
        task = loop.create_task(self._expire())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for flow in list(self.flows.values()):
            self.forget(flow)  # the tunnel is ending too: no Close needed
        for sock in self.sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        for task in self._tasks:
            task.cancel()

    def forget(self, flow: DnsFlow) -> None:
        key = (flow.sock.fileno(), flow.source)
        if self.flows.get(key) is flow:
            del self.flows[key]
        if flow.link.flows.get(flow.channel) is flow:
            del flow.link.flows[flow.channel]

    def _read(self, sock: socket.socket) -> None:
        for payload, source in datagrams(sock, "dns socket"):
            if self.split is not None and self._local(sock, source, payload):
                continue
            key = (sock.fileno(), source)
            flow = self.flows.get(key) or self._open(sock, source)
            if flow is None or not flow.link.send_datagram(flow.channel, payload):
                self.dropped += 1
                continue
            flow.bytes_out += len(payload)
            flow.last_active = time.monotonic()

    def _local(self, sock: socket.socket, source: Address, query: bytes) -> bool:
        """--dns-domains: send a query that is not for the server's side to the resolver
        (whose address the answer gets back from the kernel's NAT); False if it is."""
        split = self.split
        if split is None:
            return False
        if split.udp.own(source):
            return True  # our own query, captured: never again round the loop
        if split.domains.remote(query):
            return False
        resolver = split.resolver_for(sock.family)
        if resolver is not None:

            def answer(data: bytes) -> None:
                try:
                    sock.sendto(data, source)
                except OSError as exc:  # UDP may drop
                    log.debug("dns: local answer dropped: %s", exc.strerror)

            split.udp.send(query, resolver, answer)
        return True

    def _open(self, sock: socket.socket, source: Address) -> Optional[DnsFlow]:
        link = self.pick()
        if link is None or len(self.flows) >= MAX_FLOWS:  # no stream up: dropped, not sent
            return None
        channel = link.mux.open_udp(*self.server)
        flow = DnsFlow(self, link, channel, sock, source)
        self.flows[(sock.fileno(), source)] = flow
        link.flows[channel] = flow
        log.debug("dns channel %d: %s:%d -> %s:%d", channel, *source, *self.server)
        return flow

    def _end(self, flow: DnsFlow, reason: str) -> None:
        flow.link.mux.close(flow.channel, reason)
        flow.link.schedule_flush()
        self.forget(flow)

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(IDLE_TIMEOUT / 4)
            now = time.monotonic()
            for flow in [f for f in self.flows.values() if now - f.last_active > IDLE_TIMEOUT]:
                log.debug("dns channel %d: idle, closed", flow.channel)
                self._end(flow, "idle")

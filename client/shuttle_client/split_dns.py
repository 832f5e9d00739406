"""--dns-domains (split DNS): a captured query for a name in those domains is answered from
the server's side, as --dns answers every query; any other goes on, unchanged, to the
resolver it was sent to, and its answer comes back the way the remote ones do.

The question is read with dnspython (question_only: nothing past it is parsed). A query
that does not parse, or that asks no single question, is the local resolver's: it answers
it as it would without shuttle.

Our own sockets would be captured again by the session's DNS rule, and only root may mark a
socket so that the rule lets it by: firewalld hands over bypass sockets (firewalld's
bypass.py) with the session's bypass mark. UDP queries leave from one bypass socket per IP
version; answers are matched to their query by resolver and DNS id. A TCP connection's
first query decides where the connection goes: to the server's resolver as a channel, or
from a bypass TCP socket of its own to the resolver it was meant for, which the client then
relays.
"""

import asyncio
import logging
import socket
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import dns.exception
import dns.message
import dns.name

from .firewall_session import FirewallError, FirewallSession
from .logs import Throttle
from .proxy import LIMIT_LOG_INTERVAL, Destination, Preloaded, Tunnels, relay_for
from .resolvers import DNS_PORT

log = logging.getLogger("shuttle")

Address = Tuple[str, int]
MAX_DOMAINS = 64
MAX_DATAGRAM = 65535
READ_BATCH = 64  # datagrams read per wake-up (datagrams())
PENDING_TIMEOUT = 10.0  # a resolver retries sooner: an older query will not be answered
MAX_PENDING = 1024  # local UDP queries awaiting their answer
RETRY_AFTER = 5.0  # seconds before asking firewalld again after a refused bypass socket
FIRST_QUERY_TIMEOUT = 10.0  # seconds a TCP connection has to send its first query
# Local queries dropped (no bypass socket, too many pending, a clash of ids), for the log.
DROPPED = Throttle(LIMIT_LOG_INTERVAL)


def datagrams(sock: socket.socket, what: str) -> Iterator[Tuple[bytes, Address]]:
    """What a non-blocking UDP socket has now, with each sender's address and port: at most
    READ_BATCH per wake-up, so one busy socket cannot starve the loop. An error ends the
    batch (logged as what's, for debugging: UDP may lose datagrams)."""
    for _ in range(READ_BATCH):
        try:
            data, source = sock.recvfrom(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("%s: %s", what, exc.strerror)
            return
        yield data, (source[0], source[1])


def parse_domains(text: str) -> Tuple[str, ...]:
    """ "corp.example,Internal." → ("corp.example", "internal"); ValueError for a name
    that is not one, the root, or more than MAX_DOMAINS of them."""
    found: List[str] = []
    for given in text.split(","):
        item = given.strip()
        if not item:
            continue
        try:
            name = dns.name.from_text(item)
        except dns.exception.DNSException as exc:
            raise ValueError(f"{item!r} is no domain name: {exc}") from None
        if name == dns.name.root:
            raise ValueError("the root domain would be every name: use --dns alone")
        text_form = name.to_text(omit_final_dot=True).lower()
        if text_form not in found:
            found.append(text_form)
    if not found:
        raise ValueError("no domain given")
    if len(found) > MAX_DOMAINS:
        raise ValueError(f"at most {MAX_DOMAINS} domains")
    return tuple(found)


class Domains:
    """Which queries are the server's side's."""

    def __init__(self, domains: Sequence[str]) -> None:
        self.names = tuple(dns.name.from_text(domain) for domain in domains)

    def remote(self, query: bytes) -> bool:
        """Whether this DNS message asks one question, for a name in the domains."""
        try:
            message = dns.message.from_wire(query, question_only=True)
        except (dns.exception.DNSException, ValueError):
            return False
        if len(message.question) != 1:
            return False
        name = message.question[0].name
        return any(name.is_subdomain(domain) for domain in self.names)


def kind_of(family: int, proto: str) -> str:
    """A bypass socket's kind: "udp4", "tcp6" ..."""
    return f"{proto}{6 if family == socket.AF_INET6 else 4}"


def family_of(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _dropped(why: str) -> None:
    count = DROPPED.due()
    if count:
        log.warning("split DNS: dropped %d local quer(ies): %s", count, why)


class LocalUdp:
    """Local UDP queries, sent from bypass sockets (one per IP version), and their answers."""

    def __init__(self, firewall: FirewallSession) -> None:
        self.firewall = firewall
        self.sockets: Dict[int, socket.socket] = {}
        self.pending: Dict[Tuple[Address, bytes], Tuple[Callable[[bytes], None], float]] = {}
        self._queued: Dict[int, List[Tuple[bytes, Address]]] = {}
        self._refused_at: Dict[int, float] = {}
        self._tasks: Set[asyncio.Task[Any]] = set()

    def own(self, source: Address) -> bool:
        """Whether source is one of our bypass sockets (a query of ours captured anyway:
        the session was opened anew, with another mark; never sent on again). By port: a
        socket that sent is bound to its port on every address."""
        return any(
            sock.getsockname()[1] == source[1] and family_of(source[0]) == sock.family
            for sock in self.sockets.values()
        )

    def send(self, query: bytes, resolver: Address, answer: Callable[[bytes], None]) -> None:
        """Send query to resolver; answer is called with its answer, if one comes."""
        now = time.monotonic()
        self._expire(now)
        key = (resolver, query[:2])
        if len(query) < 2 or key in self.pending or len(self.pending) >= MAX_PENDING:
            _dropped("a query with the same id is on its way, or too many are")
            return
        family = family_of(resolver[0])
        sock = self.sockets.get(family)
        if sock is None:
            if now - self._refused_at.get(family, -RETRY_AFTER) < RETRY_AFTER:
                _dropped("no bypass socket from shuttle-firewalld")
                return
            queued = self._queued.setdefault(family, [])
            if not queued:
                self._spawn(self._fetch(family))
            queued.append((query, resolver))
        self.pending[key] = (answer, now)
        if sock is not None:
            self._sendto(sock, query, resolver)

    async def _fetch(self, family: int) -> None:
        try:
            sock = await self.firewall.bypass_socket(kind_of(family, "udp"))
        except FirewallError as exc:
            log.warning("split DNS: no bypass socket for local queries: %s", exc)
            self._refused_at[family] = time.monotonic()
            for query, resolver in self._queued.pop(family, []):
                self.pending.pop((resolver, query[:2]), None)
            return
        sock.setblocking(False)
        self.sockets[family] = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._read, sock)
        for query, resolver in self._queued.pop(family, []):
            self._sendto(sock, query, resolver)

    @staticmethod
    def _sendto(sock: socket.socket, query: bytes, resolver: Address) -> None:
        try:
            sock.sendto(query, resolver)
        except OSError as exc:  # a full buffer, no route: UDP may drop, the program retries
            log.debug("split DNS: query to %s:%d dropped: %s", *resolver, exc.strerror)

    def _read(self, sock: socket.socket) -> None:
        for data, source in datagrams(sock, "split DNS: bypass socket"):
            waiting = self.pending.pop((source, data[:2]), None)
            if waiting is not None:  # else not the resolver, or an answer too late
                waiting[0](data)

    def _expire(self, now: float) -> None:
        # Insertion order is the order of age: stop at the first one still young.
        for key, (_, sent) in list(self.pending.items()):
            if now - sent < PENDING_TIMEOUT:
                break
            del self.pending[key]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Drop the sockets (the session is gone or opened anew: their mark is not its)."""
        loop = asyncio.get_running_loop()
        for sock in self.sockets.values():
            loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets.clear()
        self.pending.clear()
        self._queued.clear()
        self._refused_at.clear()
        for task in self._tasks:
            task.cancel()


class Pipe(asyncio.Protocol):
    """One side of a local TCP relay: what its transport reads goes to the other side, whose
    full buffer stops this side's reading."""

    def __init__(self, other: asyncio.Transport) -> None:
        self.other = other
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.other.write(data)

    def eof_received(self) -> Optional[bool]:
        if self.other.can_write_eof():
            self.other.write_eof()
        return True  # half-open: the other side may still answer

    def pause_writing(self) -> None:
        self.other.pause_reading()

    def resume_writing(self) -> None:
        self.other.resume_reading()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if exc is None:
            self.other.close()
        else:
            self.other.abort()


class TcpQuery(asyncio.Protocol):
    """A captured TCP connection: one to a resolver's port 53 waits for its first query,
    which decides its way; any other is relayed as always."""

    def __init__(self, split: "SplitDns", tunnels: Tunnels, destination: Destination, wait: float):
        self.split = split
        self.tunnels = tunnels
        self.destination = destination  # checked and rewritten for --dns (Capture)
        self.wait = wait
        self.resolver: Address = ("", 0)
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = b""
        self._timer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        try:
            found = self.split.original(sock)
        except OSError:
            found = ("", 0)
        if not self.split.is_resolver(found):
            self._hand_on(relay_for(self.tunnels, self.destination, self.wait))
            return
        self.resolver = found
        self._timer = asyncio.get_running_loop().call_later(FIRST_QUERY_TIMEOUT, transport.close)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) < 2:
            return
        size = int.from_bytes(self.buffer[:2], "big")
        if len(self.buffer) < 2 + size:
            return  # at most 65,537 bytes: the length prefix bounds the wait
        if self._timer is not None:
            self._timer.cancel()
        if self.split.domains.remote(self.buffer[2 : 2 + size]):
            self._hand_on(relay_for(self.tunnels, self.destination, self.wait))
        else:
            transport = self.transport
            if transport is not None:
                transport.pause_reading()
            self.split.spawn(self._local())

    def eof_received(self) -> Optional[bool]:
        return None  # before a whole query: nothing to ask, close

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _hand_on(self, inner: asyncio.Protocol) -> None:
        """The agent's path (or the wait for it) takes the connection, with what we read."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self.buffer:  # not a DNS connection: nothing was read
            transport.set_protocol(inner)
            inner.connection_made(transport)
            return
        Preloaded(inner, self.buffer).connection_made(transport)

    async def _local(self) -> None:
        """From a bypass TCP socket to the resolver the program meant, relayed here."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        try:
            sock = await self.split.firewall.bypass_socket(
                kind_of(family_of(self.resolver[0]), "tcp")
            )
        except FirewallError as exc:
            log.warning("split DNS: no bypass socket for a local TCP query: %s", exc)
            transport.abort()
            return
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, self.resolver)
            theirs, _ = await loop.connect_accepted_socket(lambda: Pipe(transport), sock=sock)
        except OSError as exc:
            sock.close()
            log.debug("split DNS: %s:%d over TCP: %s", *self.resolver, exc.strerror or exc)
            transport.abort()
            return
        if transport.is_closing():
            theirs.close()
            return
        transport.set_protocol(Pipe(theirs))
        theirs.write(self.buffer)
        transport.resume_reading()


class SplitDns:
    """--dns-domains for one capture: which queries stay local, and how they get there."""

    def __init__(
        self,
        domains: Sequence[str],
        firewall: FirewallSession,
        resolvers: Sequence[str],
        original: Destination,
    ) -> None:
        """resolvers: the captured ones; original: a TCP connection's original destination
        (SO_ORIGINAL_DST, or tproxy's own address)."""
        self.domains = Domains(domains)
        self.firewall = firewall
        self.resolvers = frozenset(resolvers)
        self.original = original
        self.udp = LocalUdp(firewall)
        self._first: Dict[int, Address] = {}
        for address in resolvers:
            self._first.setdefault(family_of(address), (address, DNS_PORT))
        self._tasks: Set[asyncio.Task[Any]] = set()

    def is_resolver(self, destination: Address) -> bool:
        return destination[1] == DNS_PORT and destination[0] in self.resolvers

    def resolver_for(self, family: int) -> Optional[Address]:
        """Where a UDP query that nat or nft redirected went: the kernel keeps its original
        destination to itself, so the first captured resolver of its IP version."""
        return self._first.get(family)

    def relay(self, tunnels: Tunnels, destination: Destination, wait: float) -> asyncio.Protocol:
        """The protocol of a captured TCP connection (proxy.serve's relay)."""
        return TcpQuery(self, tunnels, destination, wait)

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        self.udp.close()
        for task in self._tasks:
            task.cancel()

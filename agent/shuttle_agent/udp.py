"""The agent's UDP flows: one connected UDP socket per channel, its datagrams relayed both ways.

A UdpOpen gets a socket connected to its destination, so the kernel delivers only that
destination's replies, and reports its ICMP errors (port unreachable → ECONNREFUSED), which
end the flow with Close. Nothing waits: a datagram that finds the pipe or the socket full is
dropped and counted, as UDP allows. A flow that sees no datagram either way for the idle
timeout expires (Close), and a session has at most a fixed number of flows (beyond: Refused).

Both limits can be set through the agent's environment, for tests and for operators:
SHUTTLE_AGENT_UDP_IDLE (seconds, default 60) and SHUTTLE_AGENT_UDP_MAX_FLOWS (default 4096).
"""

import asyncio
import errno
import logging
import math
import os
import socket
from typing import Any, List, Mapping, Optional, Set, Tuple

from shuttle_ends.relay import Link, refusal
from shuttle_protocol.stream_messages import MAX_DATAGRAM, Close, Datagram, Refused, UdpOpen

log = logging.getLogger("shuttle")

IDLE_TIMEOUT = 60.0
MAX_FLOWS = 4096
IDLE_ENV = "SHUTTLE_AGENT_UDP_IDLE"
MAX_FLOWS_ENV = "SHUTTLE_AGENT_UDP_MAX_FLOWS"
# Name resolution is the only step of opening a flow that can take long.
RESOLVE_TIMEOUT = 60.0
# Datagrams from the client held per flow while its socket is being set up.
EARLY_DATAGRAMS = 64
# Socket errors that cost one datagram and leave the flow alive; any other ends it.
TRANSIENT_ERRORS = frozenset(
    (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS, errno.ENOMEM, errno.EMSGSIZE)
)


def settings_from_env(environ: Mapping[str, str]) -> Tuple[float, int]:
    """(idle timeout, flow cap) from the environment; a bad value is reported and ignored."""
    idle, max_flows = IDLE_TIMEOUT, MAX_FLOWS
    text = environ.get(IDLE_ENV)
    if text is not None:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value > 0:
            idle = value
        else:
            log.warning("ignoring %s=%.40r: not a positive number of seconds", IDLE_ENV, text)
    text = environ.get(MAX_FLOWS_ENV)
    if text is not None:
        if text.isascii() and text.isdigit() and len(text) <= 9:
            max_flows = int(text)
        else:
            log.warning("ignoring %s=%.40r: not a count", MAX_FLOWS_ENV, text)
    return idle, max_flows


async def connected_socket(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket connected to host:port (resolved by the loop's resolver)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    first_error: Optional[OSError] = None
    for family, kind, proto, _, address in infos:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:  # e.g. no IPv6 on this host
            first_error = first_error or exc
            continue
        try:
            sock.setblocking(False)
            sock.connect(address)  # UDP: no packet, only the route and the kernel's filter
        except OSError as exc:
            sock.close()
            first_error = first_error or exc
            continue
        return sock
    raise first_error or OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))


class UdpFlow(asyncio.DatagramProtocol):
    """One UDP channel: its connected socket, its idle timer, its counters."""

    def __init__(self, link: Link, channel: int, idle_timeout: float) -> None:
        self.link = link
        self.channel = channel
        self.transport: Optional[asyncio.DatagramTransport] = None
        self.sock: Optional[socket.socket] = None  # the transport's socket, for empty datagrams
        self.closed = False
        self.sent = 0  # datagrams sent to the destination
        self.received = 0  # datagrams received from it
        self.dropped = 0
        self._write_paused = False
        self._loop = asyncio.get_running_loop()
        self._idle_timeout = idle_timeout
        self._last_active = self._loop.time()
        self._timer: Optional[asyncio.TimerHandle] = None
        self._early: List[bytes] = []

    # -- the local socket ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.closed:  # the client closed the flow while we were setting it up
            transport.close()
            return
        self._last_active = self._loop.time()
        self._timer = self._loop.call_later(self._idle_timeout, self._check_idle)
        early, self._early = self._early, []
        for payload in early:
            self._send(payload)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.closed:
            return
        self._last_active = self._loop.time()
        if len(data) > MAX_DATAGRAM:  # possible over IPv6 (up to 65527 bytes)
            self.dropped += 1
            return
        if self.link.send_datagram(self.channel, data):
            self.received += 1
        else:
            self.dropped += 1

    def error_received(self, exc: Exception) -> None:
        if self.closed:
            return
        code = getattr(exc, "errno", None)
        if code in TRANSIENT_ERRORS:
            self.dropped += 1
            return
        # An ICMP error for an earlier datagram (port or host unreachable), or worse.
        reason = os.strerror(code) if type(code) is int and code > 0 else str(exc)
        self.fail(reason)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.closed:
            self.fail(f"socket closed: {exc}" if exc else "socket closed")

    def pause_writing(self) -> None:
        # asyncio queues datagrams the kernel refused with EAGAIN; past its high-water mark
        # (64 KiB by default) it pauses us, and we drop what the client sends until it drains.
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False

    # -- messages from the client (routed here by the Link) ----------------------------------

    def on_datagram(self, msg: Datagram) -> None:
        if self.closed:
            return
        self._last_active = self._loop.time()
        if self.transport is not None:
            self._send(msg.payload)
        elif len(self._early) < EARLY_DATAGRAMS:
            self._early.append(msg.payload)
        else:
            self.dropped += 1

    def on_close(self, msg: Close) -> None:
        self.release(f"closed by the client: {msg.reason}")

    def reset(self) -> None:
        self.link.mux.forget(self.channel)
        self.release("session over")

    # -- ending ----------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """End the flow from our side and tell the client with Close."""
        self.release(reason)
        self.link.mux.close(self.channel, reason)
        self.link.schedule_flush()

    def release(self, reason: str) -> None:
        """Close the socket and stop the timer; the caller tells the Mux."""
        if self.closed:
            return
        self.closed = True
        if self.link.flows.get(self.channel) is self:
            del self.link.flows[self.channel]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()  # connection_lost follows; closed keeps it quiet
        elif self.sock is not None:
            self.sock.close()
        log.debug(
            "udp channel %d over (%s): %d datagrams sent, %d received, %d dropped",
            self.channel,
            reason,
            self.sent,
            self.received,
            self.dropped,
        )

    # -- helpers ---------------------------------------------------------------------------

    def _send(self, payload: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._write_paused:
            self.dropped += 1
            return
        if payload:
            transport.sendto(payload)  # errors come back through error_received
            self.sent += 1
            return
        # asyncio's sendto() silently ignores empty data (before Python 3.13), yet an empty
        # datagram is a valid one (a keepalive, say), so it goes straight to the socket. If
        # asyncio has datagrams queued it may overtake them: UDP promises no order.
        if self.sock is None:
            self.dropped += 1
            return
        try:
            self.sock.send(b"")
        except (BlockingIOError, InterruptedError):
            self.dropped += 1
        except OSError as exc:
            self.error_received(exc)
        else:
            self.sent += 1

    def _check_idle(self) -> None:
        self._timer = None
        if self.closed:
            return
        idle = self._loop.time() - self._last_active
        if idle >= self._idle_timeout:
            self.fail(f"idle for {self._idle_timeout:g} s")
        else:
            self._timer = self._loop.call_later(self._idle_timeout - idle, self._check_idle)


class UdpOpener:
    """The agent's answer to UdpOpen: a flow within the cap, or Refused."""

    def __init__(
        self, link: Link, idle_timeout: float = IDLE_TIMEOUT, max_flows: int = MAX_FLOWS
    ) -> None:
        self.link = link
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        # Strong references: the event loop keeps only weak ones to running tasks.
        self._tasks: Set[asyncio.Task[None]] = set()

    def open(self, msg: UdpOpen) -> None:
        link = self.link
        if len(link.flows) >= self.max_flows:
            log.debug("udp channel %d refused: %d flows already", msg.channel, len(link.flows))
            link.mux.forget(msg.channel)
            reason = f"too many UDP flows (at most {self.max_flows})"
            link.send(Refused(msg.channel, errno.EMFILE, reason))
            return
        log.debug("udp channel %d to %s:%d", msg.channel, msg.host, msg.port)
        flow = UdpFlow(link, msg.channel, self.idle_timeout)
        # Registered now, so Datagrams that follow in the same read are held, not dropped.
        link.flows[msg.channel] = flow
        task = asyncio.get_running_loop().create_task(self._open(msg, flow))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, msg: UdpOpen, flow: UdpFlow) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = await asyncio.wait_for(connected_socket(msg.host, msg.port), RESOLVE_TIMEOUT)
            if flow.closed:  # the client gave up on the flow meanwhile
                sock.close()
                return
            flow.sock = sock
            await loop.create_datagram_endpoint(lambda: flow, sock=sock)
        # ValueError: a host that cannot be encoded for the resolver (UnicodeError).
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            code, reason = refusal(exc)
            flow.release(f"refused: {reason}")
            if msg.channel in self.link.mux.datagram_channels:
                self.link.mux.forget(msg.channel)
                self.link.send(Refused(msg.channel, code, reason))

"""The asyncio driver shared by both ends: TCP sockets ↔ channels of one Mux ↔ the pipe.

Once a channel is open, relaying is the same on both sides. Only the way a channel starts
differs (the client accepts redirected connections, the agent connects).

Flow control: a socket's bytes go out only within its channel's credit; the rest is held
and the socket stops reading. Credit goes back to the peer only once the local socket has
taken the bytes (its transport is not paused). When the pipe itself is full, channels stop
reading too, so a bulk transfer cannot queue more than a bounded amount ahead of small ones.

UDP flows have no credit: the Link routes their Datagram and Close messages to flow objects
(each side has its own kind; the agent's is udp.UdpFlow) and drops, and counts, a datagram
that would have to wait for a full pipe.
"""

import asyncio
import errno
import fcntl
import logging
import os
import socket
import struct
from typing import Callable, Dict, List, Optional, Protocol, Set, Tuple, Union

from shuttle_protocol.channel import Channel, Command, Do, Write
from shuttle_protocol.errors import ProtocolError, RemoteProtocolError
from shuttle_protocol.inflight import InFlightController
from shuttle_protocol.mux import Mux
from shuttle_protocol.schema import Message
from shuttle_protocol.stream_messages import Close, Credit, Data, Datagram, Eof, Error, Widen
from shuttle_protocol.stream_session import SessionError, StreamSession

log = logging.getLogger("shuttle")

# The pipe's write buffer size at which channels stop reading (latency control).
PIPE_HIGH_WATER = 512 * 1024
PIPE_LOW_WATER = 128 * 1024
# Linux pipes hold 64 KiB; a bigger one means fewer wakeups of us and of ssh per megabyte.
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # the constant is new in Python 3.10


def widen_pipe(fd: int) -> None:
    """Ask for a PIPE_SIZE buffer on a pipe. Best effort: an unprivileged process gets at
    most /proc/sys/fs/pipe-max-size, and sshd may give the agent a socket, not a pipe."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass


class DatagramFlow(Protocol):
    """What the Link needs from the object behind a UDP channel."""

    def on_datagram(self, msg: Datagram) -> None:
        """The peer sent a datagram on this flow."""

    def on_close(self, msg: Close) -> None:
        """The peer ended the flow (the Mux has forgotten it already)."""

    def reset(self) -> None:
        """The session is ending: release the flow's resources, send nothing."""


def refusal(exc: BaseException) -> Tuple[int, str]:
    """Errno and text for a Refused, from why a connect or a name resolution failed."""
    if isinstance(exc, socket.gaierror):
        # getaddrinfo's EAI_* codes are negative and no errno: 0 says "see the text".
        return 0, f"cannot resolve: {exc.strerror}"[:200]
    if isinstance(exc, asyncio.TimeoutError):
        return errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT)
    code = getattr(exc, "errno", None)
    if type(code) is int and 0 < code <= 4095:
        return code, os.strerror(code)[:200]
    # A host that cannot even be encoded (a DNS label over 63 characters: UnicodeError).
    return 0, f"{type(exc).__name__}: {exc}"[:200]


class Link(asyncio.Protocol):
    """One end of the multiplexed pipe: reads, writes and dispatches to the channels."""

    def __init__(self, mux: Mux, on_message: Callable[[Message], None], peer: str) -> None:
        self.mux = mux
        self.peer = peer
        self.channels: Dict[int, Relay] = {}
        self.flows: Dict[int, DatagramFlow] = {}  # UDP channels
        self.datagrams_dropped = 0  # datagrams not sent because the pipe was full
        self.paused = False
        self.failed: Optional[str] = None  # why we ended the session, if it was an error
        self.closed: asyncio.Future[Optional[str]] = asyncio.get_running_loop().create_future()
        self._on_message = on_message
        self._writer: Optional[asyncio.WriteTransport] = None
        self._reader: Optional[asyncio.BaseTransport] = None
        self._stalled: Set[Relay] = set()
        self._flush_scheduled = False
        # Data bytes in flight (sent, not yet granted back by the peer) at which channels
        # stop reading: what a bulk transfer may queue in ssh's buffers in front of an
        # interactive byte. It follows the measured round trip.
        self.in_flight = InFlightController()
        self._loop = asyncio.get_running_loop()

    def attach_writer(self, transport: asyncio.WriteTransport) -> None:
        transport.set_write_buffer_limits(PIPE_HIGH_WATER, PIPE_LOW_WATER)
        self._writer = transport

    # -- the pipe writer's flow control (called by WriterProtocol) -------------------------

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._unstall(each=True)
        self.schedule_flush()

    @property
    def congested(self) -> bool:
        """Whether the link is congested: the pipe is full, or enough is in flight."""
        return self.paused or self.mux.in_flight >= self.in_flight.limit

    def congested_for(self, channel: int) -> bool:
        """Whether a channel must stop reading: the pipe is full, or enough is in flight
        and some of it is this channel's. A channel with nothing in flight may always send
        a read: bytes in flight may be parked at the peer, behind a socket whose program
        stopped reading, and counted against every channel they would stop all of them
        for as long as that program does not read."""
        if self.paused:
            return True
        return self.mux.in_flight >= self.in_flight.limit and self.mux.in_flight_on(channel) > 0

    def stall(self, relay: "Relay") -> None:
        """A channel stops reading until the pipe drains and credit comes back."""
        self._stalled.add(relay)

    def _unstall(self, each: bool = False) -> None:
        """Stalled channels read again: all of them once the link is not congested; with
        each (the pipe has drained), every one that congested_for lets go, such as one
        stalled by the full pipe with nothing in flight, which no Credit would wake."""
        if self._stalled and (each or not self.congested):
            stalled, self._stalled = self._stalled, set()
            for relay in stalled:
                relay.maybe_resume()  # stalls it again if it must wait still

    # -- the pipe reader (this object is its protocol) -------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._reader = transport

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.mux.receive(data)
            for msg in messages:
                if self.closed.done():  # an Error or a failure ended the session: no more
                    break
                self._dispatch(msg)
        except RemoteProtocolError as exc:
            self.fail(f"{self.peer} broke the protocol: {exc}")
        except ProtocolError as exc:
            self.fail(f"internal protocol error: {exc}")
        self._observe()
        self._unstall()  # credit may have come back
        self.schedule_flush()

    def eof_received(self) -> Optional[bool]:
        self.finish(f"{self.peer} closed the connection")
        return None

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.finish(f"{self.peer} connection lost" + (f": {exc}" if exc else ""))

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, (Datagram, Close)):
            flow = self.flows.get(msg.channel)
            if flow is not None:
                if isinstance(msg, Datagram):
                    flow.on_datagram(msg)
                else:
                    self.flows.pop(msg.channel, None)
                    flow.on_close(msg)
                return
            if isinstance(msg, Datagram):
                return  # a flow that is already gone on our side
        handler = _RELAY_HANDLERS.get(type(msg))
        if handler is None:
            self._on_message(msg)
            return
        relay = self.channels.get(msg.channel)  # type: ignore[attr-defined]
        if relay is not None:
            handler(relay, msg)

    def admit(self, session: StreamSession, msg: Message) -> bool:
        """Check a message for the driver against the session's phase: end the session if
        the phase does not allow it, send the session's reply; whether the driver must
        handle the message itself."""
        try:
            step = session.receive(msg)
        except SessionError as exc:
            self.fail(str(exc))
            return False
        if step.reply is not None:
            self.send(step.reply)
        return step.dispatch

    # -- writing ---------------------------------------------------------------------------

    def send(self, msg: Message) -> None:
        self.mux.send(msg)
        self.schedule_flush()

    def send_datagram(self, channel: int, payload: bytes) -> bool:
        """Send a datagram on a UDP channel, or drop it (False) if the pipe is full.

        UDP may lose datagrams, and a flood must not queue without bound in front of the
        TCP channels, so nothing waits for the pipe: what does not fit now is dropped.
        """
        if self.paused or self.mux.buffered >= PIPE_HIGH_WATER:
            self.datagrams_dropped += 1
            return False
        self.mux.send_datagram(channel, payload)
        self.schedule_flush()
        return True

    def schedule_flush(self) -> None:
        """Write what the Mux queued, once per loop iteration, so small sends coalesce."""
        if not self._flush_scheduled and self.mux.has_output:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        chunks = self.mux.outgoing()
        if chunks and self._writer is not None and not self._writer.is_closing():
            self._writer.write(b"".join(chunks) if len(chunks) > 1 else chunks[0])
        self._observe()

    def _observe(self) -> None:
        """Give the in-flight controller the Mux's counters: a flush may start a timed
        byte, a receive may bring its grant back."""
        mux = self.mux
        retired = mux.sent_total - mux.in_flight
        self.in_flight.observe(self._loop.time(), mux.sent_total, retired, mux.settled_total)

    # -- ending ----------------------------------------------------------------------------

    def fail(self, text: str) -> None:
        """End the session because of an error, telling the peer why."""
        log.error("%s", text)
        if self.failed is None:
            self.failed = text
        self.flush()  # what is queued (credit grants come last) goes before: Error is the last
        self.mux.send(Error(text[:1000]))
        self.flush()
        self.finish(text)

    def finish(self, reason: str) -> None:
        """End the session: reset every channel, close the pipe."""
        if self.closed.done():
            return
        for relay in list(self.channels.values()):
            relay.reset()
        self.channels.clear()
        flows, self.flows = self.flows, {}
        for flow in flows.values():
            flow.reset()
        if self._writer is not None:
            self._writer.close()
        if self._reader is not None:
            self._reader.close()
        self.closed.set_result(reason)


class WriterProtocol(asyncio.BaseProtocol):
    """Protocol of the pipe's write end; forwards flow control to the Link."""

    def __init__(self, link: Link) -> None:
        self.link = link

    def pause_writing(self) -> None:
        self.link.pause_writing()

    def resume_writing(self) -> None:
        self.link.resume_writing()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.link.finish("pipe closed" + (f": {exc}" if exc else ""))


class Relay(asyncio.Protocol):
    """One TCP socket bound to one channel: the driver of its shuttle_protocol.channel state,
    which decides; this carries out its commands on the socket."""

    # Slots: a session may hold ten thousand of these, and a dict each is most of their size.
    __slots__ = ("link", "state", "transport")

    def __init__(self, link: Link, channel: int) -> None:
        self.link = link
        self.state = Channel(link.mux, channel, link.congested_for)
        self.transport: Optional[asyncio.Transport] = None

    @property
    def channel(self) -> int:
        return self.state.channel

    @channel.setter
    def channel(self, channel: int) -> None:
        self.state.channel = channel

    @property
    def reading(self) -> bool:
        """Whether the local socket should be read (no credit or a full pipe stop it)."""
        return self.state.reading

    @property
    def bytes_out(self) -> int:
        """Read from the local socket, for the peer."""
        return self.state.bytes_out

    @property
    def bytes_in(self) -> int:
        """From the peer, for the local socket."""
        return self.state.bytes_in

    # -- the local socket ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        commands = self.state.connect()
        if not self.state.closed:
            self.link.channels[self.channel] = self
        self._carry_out(commands)

    def data_received(self, data: bytes) -> None:
        self._carry_out(self.state.local_data(data))
        self.link.schedule_flush()

    def eof_received(self) -> Optional[bool]:
        self._carry_out(self.state.local_eof())
        self.link.schedule_flush()
        return self.state.half_open

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.link.channels.get(self.channel) is self:
            del self.link.channels[self.channel]
        self._carry_out(self.state.socket_lost(f"socket closed: {exc}" if exc else "socket closed"))
        self.link.schedule_flush()

    def pause_writing(self) -> None:
        self._carry_out(self.state.pause_writing())

    def resume_writing(self) -> None:
        self._carry_out(self.state.resume_writing())
        self.link.schedule_flush()

    # -- messages from the peer ------------------------------------------------------------

    def on_data(self, msg: Data) -> None:
        self._carry_out(self.state.peer_data(msg.payload))

    def on_credit(self, _msg: Union[Credit, Widen]) -> None:
        self._carry_out(self.state.peer_credit())

    def on_eof(self, _msg: Eof) -> None:
        self._carry_out(self.state.peer_eof())

    def on_close(self, msg: Close) -> None:
        log.debug("channel %d closed by %s: %s", self.channel, self.link.peer, msg.reason)
        self._carry_out(self.state.peer_close())

    # -- also called by the Link and the client --------------------------------------------

    def maybe_resume(self) -> None:
        """Read again if the channel has credit and the pipe has room (else wait for it)."""
        self._carry_out(self.state.maybe_resume())

    def reset(self) -> None:
        """Abort the socket with a RST, so the local program sees a reset, not an EOF."""
        self._carry_out(self.state.reset())

    def _carry_out(self, commands: List[Command]) -> None:
        transport = self.transport
        if transport is None:  # the state commands a socket only once it is connected
            return
        for command in commands:
            if type(command) is Write:
                transport.write(command.payload)
                # After the write: a write that fills the buffer pauses writing first.
                self.state.written(len(command.payload))
            elif command is Do.PAUSE_READING:
                transport.pause_reading()
            elif command is Do.RESUME_READING:
                transport.resume_reading()
            elif command is Do.STALL:
                self.link.stall(self)
            elif command is Do.SHUT_WRITE:
                if transport.can_write_eof():
                    transport.write_eof()
            elif command is Do.CLOSE:
                transport.close()
            elif command is Do.RESET:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    # Linger with a zero timeout makes close() send RST instead of FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()


_RELAY_HANDLERS: Dict[type, Callable[[Relay, Message], None]] = {
    Data: Relay.on_data,  # type: ignore[dict-item]
    Credit: Relay.on_credit,  # type: ignore[dict-item]
    Widen: Relay.on_credit,  # type: ignore[dict-item]
    Eof: Relay.on_eof,  # type: ignore[dict-item]
    Close: Relay.on_close,  # type: ignore[dict-item]
}

"""One TCP channel's life between its local socket and the Mux, sans-IO: held bytes, EOF each
way, closing, connecting, credit.

Everything that decides what happens to a channel lives here. Events come in as method calls
(the local socket connected, read, said EOF, was lost, filled or drained its write buffer;
the peer sent Data, Credit, Eof or Close); each returns the commands, in order, that the
driver carries out on the socket (shuttle_ends.relay.Relay is that driver; some events
return none yet, but the driver need not know which). Messages for the peer go into the
Mux directly, as every sans-IO sender here queues them.

Credit: the channel sends only within credit() (the Mux's count: one window per channel,
given to the Mux at construction); what the credit does not cover is held, and the socket
stops reading until Credit comes back. `_send_held` is the one place that spends credit on
held bytes, and `local_data` the one that spends it on a fresh read.
"""

import enum
from typing import Callable, List, NamedTuple, Union

from .mux import Mux


class Write(NamedTuple):
    """Write these bytes to the local socket; then tell the channel: written(len)."""

    payload: bytes


class Do(enum.Enum):
    """The commands without an argument."""

    PAUSE_READING = "pause reading the socket"
    RESUME_READING = "resume reading the socket"
    STALL = "stop reading until the link is no longer congested"  # the driver parks it
    SHUT_WRITE = "shut the socket's write side (FIN), if it can"
    CLOSE = "close the socket"
    RESET = "abort the socket with a RST"


Command = Union[Write, Do]


class Channel:
    """The state of one TCP channel. congested(channel): whether the link wants channels
    that read to stop (a full pipe, or too much in flight with some of it this channel's)."""

    # Slots: a session may hold ten thousand of these.
    __slots__ = (
        "_early",
        "_held",
        "_undelivered",
        "bytes_in",
        "bytes_out",
        "channel",
        "closed",
        "congested",
        "connected",
        "eof_read",
        "eof_received",
        "eof_sent",
        "mux",
        "reading",
        "write_paused",
    )

    def __init__(self, mux: Mux, channel: int, congested: Callable[[int], bool]) -> None:
        self.mux = mux
        self.channel = channel
        self.congested = congested
        self.connected = False  # the local socket is there (the agent connects first)
        self._early: List[bytes] = []  # peer data that arrived before the socket connected
        self._held = b""  # bytes read locally that the channel's credit did not cover
        self._undelivered = 0  # bytes written while the socket's buffer was full
        self.write_paused = False
        self.reading = True  # whether the local socket is read
        self.eof_read = False  # our socket said EOF
        self.eof_sent = False
        self.eof_received = False  # the peer's Eof came
        self.closed = False
        self.bytes_out = 0  # read from the local socket, for the peer
        self.bytes_in = 0  # from the peer, for the local socket

    @property
    def half_open(self) -> bool:
        """Whether the socket stays open after its EOF: the peer may still send, or we
        still hold bytes."""
        return not (self.eof_received and self.eof_sent)

    def credit(self) -> int:
        """What the channel may send now: the one question about credit, asked of the Mux,
        which keeps each channel's window (given at construction) and what it has spent."""
        return self.mux.credit(self.channel)

    # -- the local socket ------------------------------------------------------------------

    def connect(self) -> List[Command]:
        """The local socket is there: write what came early, pass on an early Eof."""
        self.connected = True
        if self.closed:  # the peer closed the channel while we were connecting
            return self.reset()
        commands: List[Command] = [Write(payload) for payload in self._early]
        self._early.clear()
        if self.eof_received:
            commands += self._shut_write()
        return commands

    def local_data(self, data: bytes) -> List[Command]:
        """The socket read data."""
        self.bytes_out += len(data)
        mux = self.mux
        commands: List[Command] = []
        if len(data) <= self.credit() and not self._held:
            mux.send_data(self.channel, data)
        else:
            self._held += data
            commands += self._send_held()
        if self._held or self.credit() == 0:
            commands += self._pause_reading()
        elif self.congested(self.channel):
            commands += self._pause_reading()
            commands.append(Do.STALL)
        return commands

    def local_eof(self) -> List[Command]:
        """The socket said EOF: ours goes to the peer once nothing is held (see half_open)."""
        self.eof_read = True
        return self._send_held()

    def socket_lost(self, reason: str) -> List[Command]:
        """The socket is gone; the peer's socket is reset unless both EOFs went through."""
        self.closed = True
        if not (self.eof_sent and self.eof_received):
            self.mux.close(self.channel, reason)
        return []

    def written(self, n: int) -> None:
        """The driver wrote n bytes (a Write): credit for them once the socket took them."""
        if self.write_paused:
            self._undelivered += n
        else:
            self.mux.delivered(self.channel, n)

    def pause_writing(self) -> List[Command]:
        """The socket's write buffer is full: what is written now is not delivered yet."""
        self.write_paused = True
        return []

    def resume_writing(self) -> List[Command]:
        """The socket's write buffer drained: grant credit for what waited in it."""
        self.write_paused = False
        if self._undelivered:
            self.mux.delivered(self.channel, self._undelivered)
            self._undelivered = 0
        return []

    # -- messages from the peer ------------------------------------------------------------

    def peer_data(self, payload: bytes) -> List[Command]:
        self.bytes_in += len(payload)
        if not self.connected:
            self._early.append(payload)
            return []
        if self.closed:
            return []
        return [Write(payload)]

    def peer_credit(self) -> List[Command]:
        return self._send_held() + self.maybe_resume()

    def peer_eof(self) -> List[Command]:
        self.eof_received = True
        return self._shut_write() if self.connected else []

    def peer_close(self) -> List[Command]:
        return self.reset()

    # -- both ------------------------------------------------------------------------------

    def maybe_resume(self) -> List[Command]:
        """Read again if the channel has credit and the pipe has room (else wait for it)."""
        if self.reading or self._held or self.eof_read or self.closed:
            return []
        if not self.credit() or not self.connected:
            return []
        if self.congested(self.channel):
            return [Do.STALL]
        self.reading = True
        return [Do.RESUME_READING]

    def reset(self) -> List[Command]:
        """End the channel at once: the local program sees a reset, not an EOF."""
        self.mux.forget(self.channel)
        self.closed = True
        return [Do.RESET] if self.connected else []

    def _pause_reading(self) -> List[Command]:
        if self.reading and self.connected:
            self.reading = False
            return [Do.PAUSE_READING]
        return []

    def _send_held(self) -> List[Command]:
        """Send held bytes within credit, then our Eof once nothing is held."""
        mux = self.mux
        if self._held:
            n = min(len(self._held), self.credit())
            if n:
                mux.send_data(self.channel, self._held[:n])
                self._held = self._held[n:]
        if self.eof_read and not self._held and not self.eof_sent:
            self.eof_sent = True
            mux.send_eof(self.channel)
            if self.eof_received and self.connected:
                return [Do.CLOSE]
        return []

    def _shut_write(self) -> List[Command]:
        if not self.connected or self.closed:
            return []
        return [Do.CLOSE] if self.eof_sent else [Do.SHUT_WRITE]

"""Sans-IO channel multiplexer: many TCP streams over one pipe, each with credit windows.

Both ends run one Mux. Sending a message appends its bytes to an outgoing list that the
driver writes to the pipe; received bytes go in through receive(), which returns the
messages the driver must act on, after the Mux has applied its flow-control rules:

- Each side may send at most `window` bytes of Data on a channel before the receiver grants
  more with Credit. A receiver grants credit only for bytes it has delivered to its local
  socket, so no channel buffers more than one window on either side.
- Channel ids come from the client, strictly increasing and never reused, so a late message
  for a channel that is already gone is dropped, not misdelivered.
- A channel is forgotten after Close (either way) or once Eof has gone both ways.
"""

from typing import Dict, List, Optional, Union

from .errors import LocalProtocolError, RemoteProtocolError
from .schema import Message
from .stream import StreamDecoder, encode
from .stream_messages import (
    MAX_CHANNEL,
    MAX_CREDIT,
    MAX_DATA,
    Close,
    Credit,
    Data,
    Eof,
    Open,
    Opened,
    Refused,
)

WINDOW = 1024 * 1024
CLIENT = "client"
AGENT = "agent"


class ChannelState:
    """Flow-control bookkeeping of one channel."""

    __slots__ = ("eof_received", "eof_sent", "recv_left", "send_credit", "unacked")

    def __init__(self, window: int) -> None:
        self.send_credit = window  # bytes we may still send
        self.recv_left = window  # bytes the peer may still send
        self.unacked = 0  # bytes delivered locally, not yet granted back
        self.eof_sent = False
        self.eof_received = False


class Mux:
    """One end of the multiplexed pipe. role is CLIENT (opens channels) or AGENT."""

    def __init__(self, role: str, window: int = WINDOW) -> None:
        if role not in (CLIENT, AGENT):
            raise LocalProtocolError(f"unknown role {role!r}")
        if not MAX_DATA <= window <= MAX_CREDIT:
            raise LocalProtocolError(f"window must be in [{MAX_DATA}, {MAX_CREDIT}]")
        self.role = role
        self.window = window
        self.channels: Dict[int, ChannelState] = {}
        self._credit_batch = window // 4
        self._decoder = StreamDecoder()
        self._out: List[bytes] = []
        self._out_size = 0
        self._last_channel = 0
        self._failed: Optional[RemoteProtocolError] = None

    # -- sending -------------------------------------------------------------------------

    def send(self, msg: Message) -> None:
        """Queue any message. Channel messages should go through the methods below."""
        data = encode(msg)
        self._out.append(data)
        self._out_size += len(data)

    def open(self, host: str, port: int) -> int:
        """Client: open a new channel to host:port; returns its id."""
        if self.role != CLIENT:
            raise LocalProtocolError("only the client opens channels")
        self._last_channel += 1
        channel = self._last_channel
        self.send(Open(channel, host, port))
        self.channels[channel] = ChannelState(self.window)
        return channel

    def send_data(self, channel: int, data: Union[bytes, memoryview]) -> None:
        """Queue data for a channel; the caller must stay within credit(channel)."""
        state = self._live(channel)
        if state.eof_sent:
            raise LocalProtocolError(f"channel {channel}: data after Eof")
        if len(data) > state.send_credit:
            raise LocalProtocolError(f"channel {channel}: {len(data)} bytes exceed the credit")
        state.send_credit -= len(data)
        for start in range(0, len(data), MAX_DATA):
            self.send(Data(channel, bytes(data[start : start + MAX_DATA])))

    def _live(self, channel: int) -> ChannelState:
        state = self.channels.get(channel)
        if state is None:
            raise LocalProtocolError(f"channel {channel} is not open")
        return state

    def credit(self, channel: int) -> int:
        """How many bytes the channel may send now (0 for a channel that is gone)."""
        state = self.channels.get(channel)
        return state.send_credit if state is not None and not state.eof_sent else 0

    def delivered(self, channel: int, n: int) -> None:
        """n bytes of the channel's data left our buffers; grant the peer credit for them."""
        state = self.channels.get(channel)
        if state is None:
            return
        held = self.window - state.recv_left - state.unacked  # received, not yet delivered
        if type(n) is not int or not 0 <= n <= held:
            raise LocalProtocolError(f"channel {channel}: {n!r:.40} bytes delivered, {held} held")
        state.unacked += n
        if state.unacked >= self._credit_batch and not state.eof_received:
            self.send(Credit(channel, state.unacked))
            state.recv_left += state.unacked
            state.unacked = 0

    def send_eof(self, channel: int) -> None:
        """Our side of the channel will send no more data."""
        state = self.channels.get(channel)
        if state is None or state.eof_sent:
            return
        state.eof_sent = True
        self.send(Eof(channel))
        if state.eof_received:
            del self.channels[channel]

    def close(self, channel: int, reason: str) -> None:
        """Abort the channel: the peer resets its socket. Nothing is sent for a dead one."""
        if self.channels.pop(channel, None) is not None:
            self.send(Close(channel, reason[:200]))

    def forget(self, channel: int) -> None:
        """Drop a channel without telling the peer (it told us it is gone)."""
        self.channels.pop(channel, None)

    def outgoing(self) -> List[bytes]:
        """Take the queued bytes, in order, for writing to the pipe."""
        out, self._out, self._out_size = self._out, [], 0
        return out

    @property
    def buffered(self) -> int:
        """Bytes queued and not yet taken by outgoing()."""
        return self._out_size

    # -- receiving -----------------------------------------------------------------------

    def receive(self, data: bytes) -> List[Message]:
        """Feed bytes from the pipe; return the messages the driver must act on."""
        if self._failed is not None:
            raise self._failed
        actions: List[Message] = []
        try:
            for msg in self._decoder.feed(data):
                if self._accept(msg):
                    actions.append(msg)
        except RemoteProtocolError as exc:
            self._failed = exc  # the pipe is in an unknown state: refuse it from now on
            raise
        return actions

    def _accept(self, msg: Message) -> bool:
        """Apply flow control to one message; False drops it (a channel already gone)."""
        channel = getattr(msg, "channel", None)
        if channel is None:
            return True
        if isinstance(msg, Open):
            return self._accept_open(msg)
        if isinstance(msg, (Opened, Refused)) and self.role != CLIENT:
            raise RemoteProtocolError(f"{type(msg).__name__} sent to the agent")
        state = self.channels.get(channel)
        if state is None:
            if channel > self._last_channel:
                name = type(msg).__name__
                raise RemoteProtocolError(f"{name} for channel {channel}, never opened")
            return False
        if isinstance(msg, Data):
            return self._accept_data(state, msg)
        if isinstance(msg, Credit):
            if state.send_credit + msg.n > MAX_CREDIT:
                raise RemoteProtocolError(f"channel {channel}: credit beyond {MAX_CREDIT}")
            state.send_credit += msg.n
        elif isinstance(msg, Eof):
            if state.eof_received:
                raise RemoteProtocolError(f"channel {channel}: Eof twice")
            state.eof_received = True
            if state.eof_sent:
                del self.channels[channel]
        elif isinstance(msg, (Close, Refused)):
            del self.channels[channel]
        return True

    def _accept_open(self, msg: Open) -> bool:
        if self.role != AGENT:
            raise RemoteProtocolError("Open sent to the client")
        if msg.channel <= self._last_channel:
            raise RemoteProtocolError(f"Open reuses channel {msg.channel}")
        if msg.channel >= MAX_CHANNEL:
            raise RemoteProtocolError("channel ids exhausted")
        self._last_channel = msg.channel
        self.channels[msg.channel] = ChannelState(self.window)
        return True

    def _accept_data(self, state: ChannelState, msg: Data) -> bool:
        size = len(msg.payload)
        if state.eof_received:
            raise RemoteProtocolError(f"channel {msg.channel}: Data after Eof")
        if size > state.recv_left:
            raise RemoteProtocolError(f"channel {msg.channel}: Data beyond the credit window")
        state.recv_left -= size
        return True

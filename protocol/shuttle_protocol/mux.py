"""Sans-IO channel multiplexer: many TCP streams (with credit windows) and UDP flows over one pipe.

Both ends run one Mux. Sending a message appends its bytes to an outgoing list that the
driver writes to the pipe; received bytes go in through receive(), which returns the
messages the driver must act on, after the Mux has applied its flow-control rules:

- Each side may send at most `window` bytes of Data on a channel before the receiver grants
  more with Credit. A receiver grants credit only for bytes it has delivered to its local
  socket, so no channel buffers more than one window on either side.
- A channel's window starts at `window`. A receiver built with a larger `max_window` widens
  it (doubling, with a Widen for the extra) each time a window's worth of bytes was
  delivered, every one at once as it came: the local socket keeps up, so the window may be
  what holds the channel back, as on a long link, where one window per round trip is too
  little (the receiver cannot see the round trip; the session's in-flight limit, not this
  window, bounds what queues in the pipe). Widening is bounded per channel (max_window)
  and per Mux (WIDEN_BUDGET in all), so a buffer stays bounded too. Widen is not Credit:
  a Credit grants back bytes that were sent, never more, so the sender's in_flight is
  exact (widening sent as extra Credit once counted bytes still on their way as granted,
  and the in-flight controller then timed round trips of a millisecond on a 40 ms link).
- Channel ids come from the client, strictly increasing and never reused, so a late message
  for a channel that is already gone is dropped, not misdelivered.
- A channel is forgotten after Close (either way) or once Eof has gone both ways.
- `in_flight` counts the Data bytes sent on all channels that the peer has not yet granted
  back: bytes queued somewhere between here and the far socket. The driver caps it, so a
  bulk transfer cannot fill the pipe's buffers (ssh's among them) in front of small
  messages. Credit for delivered bytes therefore goes back at the next outgoing(), one
  Credit per channel however many Data it covers: a credit held back until a batch filled
  up would leave idle channels' bytes counted for ever.
- Latency: outgoing() puts everything else before the Data (and Eof) of bulk channels,
  those with BULK bytes or more in flight when they sent: an interactive byte, a Credit or
  a datagram never waits behind bulk data queued here, only behind what is already on its
  way (at most the in-flight limit the driver keeps, whose controller holds the queueing
  delay to its target). A channel's own frames stay in order: once it has a frame in the
  bulk queue, all its Data and its Eof go there until the queue is taken.
- A UDP channel (UdpOpen) carries Datagram messages and has no window: datagrams may be
  dropped, so the driver drops them when the pipe is full instead of queueing them. Its
  ids come from the same sequence as TCP channels. Data, Credit, Widen, Eof and Opened are a
  TCP channel's messages, Datagram a UDP channel's; the other kind is the peer's protocol error.
  It ends with Close either way, or Refused from the agent.
"""

from typing import Dict, List, Optional, Set, Union

from .errors import LocalProtocolError, RemoteProtocolError
from .schema import Message
from .stream import StreamDecoder, encode, encode_data_header
from .stream_messages import (
    MAX_CHANNEL,
    MAX_CREDIT,
    MAX_DATA,
    Close,
    Credit,
    Data,
    Datagram,
    Eof,
    Open,
    Opened,
    Refused,
    UdpOpen,
    Widen,
)

WINDOW = 1024 * 1024
MAX_WINDOW = 16 * 1024 * 1024  # a channel's window on a long link: 400 MB/s at 40 ms
WIDEN_BUDGET = 128 * 1024 * 1024  # all channels' widening together, on one Mux
# A channel with this much in flight is a bulk transfer: its frames go after the others'.
# Less than one read of a busy socket (256 KiB), more than an interactive exchange.
BULK = 64 * 1024
CLIENT = "client"
AGENT = "agent"


class ChannelState:
    """Flow-control bookkeeping of one channel."""

    __slots__ = (
        "eof_received",
        "eof_sent",
        "kept_up",
        "recv_left",
        "send_credit",
        "recv_window",
        "send_window",
        "unacked",
        "widening",
    )

    def __init__(self, window: int) -> None:
        # Each direction has its own window, and either may widen: what we allow the peer
        # unacknowledged, and what the peer allows us.
        self.recv_window = window
        self.send_window = window
        self.kept_up = 0  # bytes delivered as they came, since the last widening
        self.send_credit = window  # bytes we may still send
        self.recv_left = window  # bytes the peer may still send
        self.unacked = 0  # bytes delivered locally, not yet granted back
        self.widening = 0  # bytes of widening not yet sent
        self.eof_sent = False
        self.eof_received = False


class Mux:
    """One end of the multiplexed pipe. role is CLIENT (opens channels) or AGENT."""

    def __init__(self, role: str, window: int = WINDOW, max_window: int = 0) -> None:
        if role not in (CLIENT, AGENT):
            raise LocalProtocolError(f"unknown role {role!r}")
        if not MAX_DATA <= window <= MAX_CREDIT:
            raise LocalProtocolError(f"window must be in [{MAX_DATA}, {MAX_CREDIT}]")
        if max_window and not window <= max_window <= MAX_CREDIT:
            raise LocalProtocolError(f"max_window must be in [{window}, {MAX_CREDIT}] or 0")
        self.role = role
        self.window = window
        self.max_window = max_window or window  # 0: windows never widen
        self.widened = 0  # bytes of widening granted in all, at most WIDEN_BUDGET
        self.channels: Dict[int, ChannelState] = {}  # TCP channels
        self.datagram_channels: Set[int] = set()  # UDP channels
        self._grants: Dict[int, ChannelState] = {}  # channels with bytes to grant back
        self.in_flight = 0  # Data bytes sent and not granted back, all channels together
        # For the in-flight controller (inflight.py): Data bytes sent in all, and of those
        # the ones that stopped counting without a grant (their channel went).
        self.sent_total = 0
        self.settled_total = 0
        self.received_total = 0  # Data bytes received in all (for the client's sessions)
        self._decoder = StreamDecoder()
        self._out: List[bytes] = []
        self._out_size = 0
        self._bulk: List[bytes] = []  # bulk channels' frames, sent after _out
        self._bulk_channels: Set[int] = set()  # channels with frames in _bulk
        self._last_channel = 0
        self._failed: Optional[RemoteProtocolError] = None

    # -- sending -------------------------------------------------------------------------

    def send(self, msg: Message) -> None:
        """Queue any message. Channel messages should go through the methods below."""
        data = encode(msg)
        self._out.append(data)
        self._out_size += len(data)

    def open(self, host: str, port: int) -> int:
        """Client: open a new TCP channel to host:port; returns its id."""
        if self.role != CLIENT:
            raise LocalProtocolError("only the client opens channels")
        self._last_channel += 1
        channel = self._last_channel
        self.send(Open(channel, host, port))
        self.channels[channel] = ChannelState(self.window)
        return channel

    def open_udp(self, host: str, port: int) -> int:
        """Client: open a new UDP flow to host:port; returns its channel id."""
        if self.role != CLIENT:
            raise LocalProtocolError("only the client opens channels")
        channel = self._last_channel + 1
        self.send(UdpOpen(channel, host, port))
        self._last_channel = channel
        self.datagram_channels.add(channel)
        return channel

    def send_datagram(self, channel: int, payload: Union[bytes, memoryview]) -> None:
        """Queue one datagram for a UDP channel. No credit: the driver decides what to drop."""
        if channel not in self.datagram_channels:
            raise LocalProtocolError(f"channel {channel} is not an open UDP channel")
        self.send(Datagram(channel, bytes(payload)))

    def send_data(self, channel: int, data: Union[bytes, memoryview]) -> None:
        """Queue data for a channel; the caller must stay within credit(channel)."""
        state = self._live(channel)
        if state.eof_sent:
            raise LocalProtocolError(f"channel {channel}: data after Eof")
        if len(data) > state.send_credit:
            raise LocalProtocolError(f"channel {channel}: {len(data)} bytes exceed the credit")
        if channel not in self._bulk_channels and self.in_flight_on(channel) >= BULK:
            self._bulk_channels.add(channel)
        queue = self._bulk if channel in self._bulk_channels else self._out
        state.send_credit -= len(data)
        self.in_flight += len(data)
        self.sent_total += len(data)
        for start in range(0, len(data), MAX_DATA):
            # Header and payload go out as they are: the driver's join is the only copy.
            payload = data if len(data) <= MAX_DATA else data[start : start + MAX_DATA]
            if type(payload) is not bytes:
                payload = bytes(payload)  # a view's buffer could change before the write
            header = encode_data_header(channel, len(payload))
            queue += (header, payload)
            self._out_size += len(header) + len(payload)

    def _live(self, channel: int) -> ChannelState:
        state = self.channels.get(channel)
        if state is None:
            if channel in self.datagram_channels:
                raise LocalProtocolError(f"channel {channel} is a UDP channel")
            raise LocalProtocolError(f"channel {channel} is not open")
        return state

    def credit(self, channel: int) -> int:
        """How many bytes the channel may send now (0 for a channel that is gone)."""
        state = self.channels.get(channel)
        return state.send_credit if state is not None and not state.eof_sent else 0

    def in_flight_on(self, channel: int) -> int:
        """The channel's part of in_flight: its Data sent and not granted back (0 once its
        Eof went, or for a channel that is gone)."""
        state = self.channels.get(channel)
        if state is None or state.eof_sent:
            return 0
        return state.send_window - state.send_credit

    def delivered(self, channel: int, n: int) -> None:
        """n bytes of the channel's data left our buffers; grant the peer credit for them."""
        state = self.channels.get(channel)
        if state is None:
            return
        held = state.recv_window - state.recv_left - state.unacked  # received, not yet delivered
        if type(n) is not int or not 0 <= n <= held:
            raise LocalProtocolError(f"channel {channel}: {n!r:.40} bytes delivered, {held} held")
        state.unacked += n
        if n and not state.eof_received:
            state.kept_up = state.kept_up + n if n == held else 0
            if state.kept_up >= state.recv_window:
                self._widen(state)
            self._grants[channel] = state

    def _widen(self, state: ChannelState) -> None:
        """Our socket took a whole window as it came: double the window, within the bounds;
        the extra goes in a Widen after the Credit."""
        state.kept_up = 0
        window = state.recv_window
        extra = min(window, self.max_window - window, WIDEN_BUDGET - self.widened)
        if extra > 0:
            state.recv_window += extra
            state.widening += extra
            self.widened += extra

    def send_eof(self, channel: int) -> None:
        """Our side of the channel will send no more data."""
        if channel in self.datagram_channels:
            raise LocalProtocolError(f"channel {channel}: Eof on a UDP channel")
        state = self.channels.get(channel)
        if state is None or state.eof_sent:
            return
        self._settle(state)  # the peer grants nothing after our Eof
        state.eof_sent = True
        if channel in self._bulk_channels:  # after its queued Data
            eof = encode(Eof(channel))
            self._bulk.append(eof)
            self._out_size += len(eof)
        else:
            self.send(Eof(channel))
        if state.eof_received:
            del self.channels[channel]

    def _settle(self, state: ChannelState) -> None:
        """The channel's ungranted bytes will never be granted: stop counting them."""
        if not state.eof_sent:
            ungranted = state.send_window - state.send_credit
            self.in_flight -= ungranted
            self.settled_total += ungranted

    def close(self, channel: int, reason: str) -> None:
        """Abort the channel: the peer resets its socket. Nothing is sent for a dead one."""
        state = self.channels.pop(channel, None)
        if state is not None:
            self._settle(state)
        if state is not None or channel in self.datagram_channels:
            self.datagram_channels.discard(channel)
            self.send(Close(channel, reason[:200]))

    def forget(self, channel: int) -> None:
        """Drop a channel without telling the peer (it told us it is gone)."""
        state = self.channels.pop(channel, None)
        if state is not None:
            self._settle(state)
        self.datagram_channels.discard(channel)

    def outgoing(self) -> List[bytes]:
        """Take the queued bytes for writing to the pipe: messages in order, credit grants
        after them, bulk channels' frames (in their order) last."""
        grants, self._grants = self._grants, {}
        for channel, state in grants.items():
            if state.eof_received or self.channels.get(channel) is not state:
                continue
            if state.unacked:
                self.send(Credit(channel, state.unacked))
                state.recv_left += state.unacked
                state.unacked = 0
            if state.widening:
                self.send(Widen(channel, state.widening))
                state.recv_left += state.widening
                state.widening = 0
        out, self._out, self._out_size = self._out, [], 0
        if self._bulk:
            out += self._bulk
            self._bulk = []
            self._bulk_channels.clear()
        return out

    @property
    def buffered(self) -> int:
        """Bytes queued and not yet taken by outgoing() (credit grants not included)."""
        return self._out_size

    @property
    def has_output(self) -> bool:
        """Whether outgoing() would return anything: queued bytes or credit to grant."""
        return bool(self._out or self._bulk or self._grants)

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
        if isinstance(msg, (Open, UdpOpen)):
            return self._accept_open(msg)
        if isinstance(msg, (Opened, Refused)) and self.role != CLIENT:
            raise RemoteProtocolError(f"{type(msg).__name__} sent to the agent")
        if channel in self.datagram_channels:
            return self._accept_on_datagram_channel(msg, channel)
        state = self.channels.get(channel)
        if state is None:
            if channel > self._last_channel:
                name = type(msg).__name__
                raise RemoteProtocolError(f"{name} for channel {channel}, never opened")
            return False
        return self._accept_on_stream_channel(state, msg, channel)

    def _accept_on_stream_channel(self, state: ChannelState, msg: Message, channel: int) -> bool:
        if isinstance(msg, Datagram):
            raise RemoteProtocolError(f"channel {channel}: Datagram on a TCP channel")
        if isinstance(msg, Data):
            return self._accept_data(state, msg)
        if isinstance(msg, Credit):
            if msg.n > state.send_window - state.send_credit:
                raise RemoteProtocolError(f"channel {channel}: credit for bytes never sent")
            if not state.eof_sent:
                self.in_flight -= msg.n
            state.send_credit += msg.n
        elif isinstance(msg, Widen):
            if state.send_window + msg.n > MAX_CREDIT:
                raise RemoteProtocolError(f"channel {channel}: a window beyond {MAX_CREDIT}")
            state.send_window += msg.n
            state.send_credit += msg.n
        elif isinstance(msg, Eof):
            if state.eof_received:
                raise RemoteProtocolError(f"channel {channel}: Eof twice")
            state.eof_received = True
            if state.eof_sent:
                del self.channels[channel]
        elif isinstance(msg, (Close, Refused)):
            self._settle(state)
            del self.channels[channel]
        return True

    def _accept_open(self, msg: Union[Open, UdpOpen]) -> bool:
        name = type(msg).__name__
        if self.role != AGENT:
            raise RemoteProtocolError(f"{name} sent to the client")
        if msg.channel <= self._last_channel:
            raise RemoteProtocolError(f"{name} reuses channel {msg.channel}")
        if msg.channel >= MAX_CHANNEL:
            raise RemoteProtocolError("channel ids exhausted")
        self._last_channel = msg.channel
        if isinstance(msg, UdpOpen):
            self.datagram_channels.add(msg.channel)
        else:
            self.channels[msg.channel] = ChannelState(self.window)
        return True

    def _accept_on_datagram_channel(self, msg: Message, channel: int) -> bool:
        if isinstance(msg, Datagram):
            return True
        if isinstance(msg, (Close, Refused)):
            self.datagram_channels.discard(channel)
            return True
        raise RemoteProtocolError(f"channel {channel}: {type(msg).__name__} on a UDP channel")

    def _accept_data(self, state: ChannelState, msg: Data) -> bool:
        size = len(msg.payload)
        if state.eof_received:
            raise RemoteProtocolError(f"channel {msg.channel}: Data after Eof")
        if size > state.recv_left:
            raise RemoteProtocolError(f"channel {msg.channel}: Data beyond the credit window")
        state.recv_left -= size
        self.received_total += size
        return True

"""The relay's flow control against a peer that parks bytes: a channel whose local program
stopped reading must not stop the other channels of the link.

The client's Link and Relays run on fake socket transports; the peer is a real agent-side
Mux fed with what the Link writes, granting credit only for what its sockets took.
"""

import asyncio
from typing import Any, Dict, List, Optional, Tuple

from shuttle_ends.relay import Link, Relay
from shuttle_protocol.inflight import INITIAL_LIMIT, InFlightController
from shuttle_protocol.mux import AGENT, CLIENT, Mux
from shuttle_protocol.stream_messages import Data

READ = 256 * 1024  # what asyncio hands data_received at most


class FakeSocket(asyncio.Transport):
    """A local socket's transport: records whether the relay reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = True
        self.written: List[bytes] = []
        self.closed = False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class FakePipe(asyncio.WriteTransport):
    """The pipe to the peer: what the Link writes goes into the peer's Mux."""

    def __init__(self, peer: Mux) -> None:
        super().__init__()
        self.peer = peer
        self.data: Dict[int, int] = {}  # channel -> bytes of Data the peer received

    def write(self, data: Any) -> None:
        for msg in self.peer.receive(bytes(data)):
            if isinstance(msg, Data):
                self.data[msg.channel] = self.data.get(msg.channel, 0) + len(msg.payload)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def set_write_buffer_limits(
        self, high: Optional[int] = None, low: Optional[int] = None
    ) -> None:
        pass


class Pair:
    """A client Link with relays on fake sockets, and the agent-side Mux it talks to."""

    def __init__(self) -> None:
        self.link = Link(Mux(CLIENT), lambda msg: None, "agent")
        # A fixed limit: these tests are about which channels stop at it, not its value
        # (tests/protocol/test_inflight.py), and the fake pipe's round trips take no time.
        self.link.in_flight = InFlightController(INITIAL_LIMIT, INITIAL_LIMIT, INITIAL_LIMIT)
        self.peer = Mux(AGENT)
        self.pipe = FakePipe(self.peer)
        self.link.attach_writer(self.pipe)

    def channel(self) -> Tuple[Relay, FakeSocket]:
        channel = self.link.mux.open("192.0.2.1", 7)
        relay = Relay(self.link, channel)
        sock = FakeSocket()
        relay.connection_made(sock)
        return relay, sock

    def send(self, relay: Relay, size: int) -> None:
        """The local program wrote size bytes: the relay reads them, the pipe carries them."""
        for start in range(0, size, READ):
            relay.data_received(b"x" * min(READ, size - start))
        self.link.flush()

    def peer_delivers(self, relay: Relay) -> None:
        """The peer's socket took everything of relay's channel: credit comes back."""
        self.peer.delivered(relay.channel, self.pipe.data.pop(relay.channel, 0))
        self.link.data_received(b"".join(self.peer.outgoing()))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_parked_channel_does_not_stop_another_channel() -> None:
    async def scenario() -> None:
        pair = Pair()
        parked, parked_sock = pair.channel()
        # A program sends, and the far one never reads: the bytes stay parked at the peer.
        pair.send(parked, INITIAL_LIMIT)
        assert pair.link.mux.in_flight >= INITIAL_LIMIT
        assert not parked_sock.reading, "the parked channel must stop reading"
        other, other_sock = pair.channel()
        for turn in range(8):  # another transfer goes on, one read per round trip
            pair.send(other, READ)
            assert not other_sock.reading, f"turn {turn}: in flight above the limit"
            pair.peer_delivers(other)
            assert other_sock.reading, f"turn {turn}: the other channel stays stopped"
        assert not parked_sock.reading, "the parked channel read again without credit"
        assert pair.link.mux.in_flight_on(parked.channel) >= INITIAL_LIMIT

    run(scenario())


def test_a_channel_stopped_by_the_full_pipe_reads_again_when_it_drains() -> None:
    async def scenario() -> None:
        pair = Pair()
        parked, _ = pair.channel()
        pair.send(parked, INITIAL_LIMIT)
        other, other_sock = pair.channel()
        pair.link.pause_writing()  # the pipe is full
        pair.send(other, 1000)
        assert not other_sock.reading
        pair.peer_delivers(other)  # its credit comes back while the pipe is still full
        assert not other_sock.reading
        pair.link.resume_writing()  # nothing of it in flight now: no Credit will wake it
        assert other_sock.reading, "the channel stays stopped after the pipe drained"

    run(scenario())


def test_above_the_limit_only_channels_with_nothing_in_flight_read() -> None:
    async def scenario() -> None:
        pair = Pair()
        first, first_sock = pair.channel()
        second, second_sock = pair.channel()
        pair.send(first, INITIAL_LIMIT // 2)
        pair.send(second, INITIAL_LIMIT // 2)
        assert not second_sock.reading, "the read that reached the limit stops its channel"
        pair.send(first, INITIAL_LIMIT // 2)
        assert not first_sock.reading
        pair.peer_delivers(second)
        assert pair.link.mux.in_flight >= INITIAL_LIMIT
        assert second_sock.reading, "nothing of it in flight: it may send a read"
        assert not first_sock.reading, "its own bytes are in flight, above the limit"
        pair.peer_delivers(first)
        assert first_sock.reading and second_sock.reading

    run(scenario())

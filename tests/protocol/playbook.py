"""Transcript ("playbook") tests of a channel's sans-IO state, as mitmproxy's Playbook
(test/mitmproxy/proxy/tutils.py): events in; out of each, the commands for the socket in
order, then the messages for the peer in order.

    playbook = Playbook() >> LocalData(b"hi") << Sent(Data(1, b"hi"))
    assert playbook.actual() == playbook.expected()

The peer's messages go through the channel's real Mux (its credit and EOF bookkeeping); what
the channel sends is read back from the Mux's output. Like the driver, the playbook tells the
channel that each Write was carried out (Channel.written).
"""

from typing import List, NamedTuple, Tuple, Union

from shuttle_protocol.channel import Channel, Command, Write
from shuttle_protocol.mux import AGENT, CLIENT, Mux
from shuttle_protocol.schema import Message
from shuttle_protocol.stream import StreamDecoder, encode
from shuttle_protocol.stream_messages import MAX_DATA, Close, Credit, Data, Eof, Open

CHANNEL = 1


class Connect(NamedTuple):
    """The local socket is there (the agent's connect completed)."""


class LocalData(NamedTuple):
    data: bytes


class LocalEof(NamedTuple):
    pass


class Lost(NamedTuple):
    reason: str = "socket closed"


class PauseWriting(NamedTuple):
    pass


class ResumeWriting(NamedTuple):
    pass


class Congested(NamedTuple):
    """The link turns congested (or not), then asks the channel whether it may read."""

    congested: bool


class Reset(NamedTuple):
    """The driver ends the channel (the session ends, or the remote connect was refused)."""


class FromPeer(NamedTuple):
    """A message from the peer, fed to the Mux as bytes."""

    message: Message


class Sent(NamedTuple):
    """A message the channel queued for the peer."""

    message: Message


Event = Union[
    Connect, LocalData, LocalEof, Lost, PauseWriting, ResumeWriting, Congested, Reset, FromPeer
]
Output = Union[Command, Sent]


class Playbook:
    """A channel on the client's side (connected, as the client's accepted socket is), or on
    the agent's (agent=True: the client's Open has come, the connect has not completed)."""

    def __init__(self, agent: bool = False, window: int = MAX_DATA) -> None:
        self.congested = False
        if agent:
            self.mux = Mux(AGENT, window)
            self.mux.receive(encode(Open(CHANNEL, "192.0.2.1", 80)))
        else:
            self.mux = Mux(CLIENT, window)
            self.mux.open("192.0.2.1", 80)
            self.mux.outgoing()  # the Open
        self.channel = Channel(self.mux, CHANNEL, lambda _channel: self.congested)
        if not agent:
            self.channel.connect()
        self._steps: List[Tuple[Event, List[Output]]] = []

    def __rshift__(self, event: Event) -> "Playbook":
        self._steps.append((event, []))
        return self

    def __lshift__(self, output: Output) -> "Playbook":
        self._steps[-1][1].append(output)
        return self

    def expected(self) -> List[Tuple[Event, List[Output]]]:
        return self._steps

    def actual(self) -> List[Tuple[Event, List[Output]]]:
        """Play the events; each with what came out of it."""
        return [(event, self._play(event)) for event, _ in self._steps]

    def _play(self, event: Event) -> List[Output]:
        commands = self._commands(event)
        for command in commands:
            if isinstance(command, Write):
                self.channel.written(len(command.payload))
        sent = StreamDecoder().feed(b"".join(self.mux.outgoing()))
        return [*commands, *(Sent(msg) for msg in sent)]

    def _commands(self, event: Event) -> List[Command]:
        channel = self.channel
        if isinstance(event, FromPeer):
            return self._from_peer(event.message)
        if isinstance(event, Congested):
            self.congested = event.congested
            return channel.maybe_resume()
        if isinstance(event, LocalData):
            return channel.local_data(event.data)
        if isinstance(event, Lost):
            return channel.socket_lost(event.reason)
        # The events without an argument: what each calls.
        return {
            Connect: channel.connect,
            LocalEof: channel.local_eof,
            Reset: channel.reset,
            PauseWriting: channel.pause_writing,
            ResumeWriting: channel.resume_writing,
        }[type(event)]()

    def _from_peer(self, message: Message) -> List[Command]:
        commands: List[Command] = []
        for msg in self.mux.receive(encode(message)):
            if isinstance(msg, Data):
                commands += self.channel.peer_data(msg.payload)
            elif isinstance(msg, Credit):
                commands += self.channel.peer_credit()
            elif isinstance(msg, Eof):
                commands += self.channel.peer_eof()
            elif isinstance(msg, Close):
                commands += self.channel.peer_close()
        return commands

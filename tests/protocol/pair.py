"""Two Muxes back to back in memory, for the tests of the multiplexer."""

from typing import List

from shuttle_protocol.mux import AGENT, CLIENT, WINDOW, Mux
from shuttle_protocol.schema import Message
from shuttle_protocol.stream_messages import Open, Opened, UdpOpen


class Pair:
    """A client and an agent Mux wired back to back, as h11's ConnectionPair."""

    def __init__(self, window: int = WINDOW, max_window: int = 0) -> None:
        self.client = Mux(CLIENT, window, max_window)
        self.agent = Mux(AGENT, window, max_window)

    def to_agent(self) -> List[Message]:
        return self.agent.receive(b"".join(self.client.outgoing()))

    def to_client(self) -> List[Message]:
        return self.client.receive(b"".join(self.agent.outgoing()))

    def open(self) -> int:
        channel = self.client.open("example.org", 80)
        assert self.to_agent() == [Open(channel, "example.org", 80)]
        self.agent.send(Opened(channel))
        assert self.to_client() == [Opened(channel)]
        return channel

    def open_udp(self) -> int:
        channel = self.client.open_udp("192.0.2.53", 53)
        assert self.to_agent() == [UdpOpen(channel, "192.0.2.53", 53)]
        return channel

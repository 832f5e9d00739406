"""What the control socket lists: every open channel and flow describes itself (Listed), so
that Streams.connections need know none of their classes."""

from typing import Protocol, Tuple, runtime_checkable

from shuttle_protocol.control_messages import Connection

from .targets import endpoint

Address = Tuple[str, int]


@runtime_checkable
class Listed(Protocol):
    """A channel or flow the control socket lists."""

    def describe(self, now: float, stream: int) -> Connection:
        """Its entry; stream: the stream that carries it (the index of its link)."""
        ...


class Counted(Protocol):
    """What a UDP flow counts (UdpFlow, DnsFlow)."""

    @property
    def channel(self) -> int: ...
    @property
    def source(self) -> Address: ...
    @property
    def destination(self) -> Address: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def bytes_in(self) -> int: ...
    @property
    def opened_at(self) -> float: ...


def udp_entry(flow: Counted, now: float, stream: int) -> Connection:
    """A UDP flow's entry in the list, its bytes counted in datagrams' payloads."""
    host, port = flow.destination
    age = max(0.0, now - flow.opened_at)
    return (
        flow.channel,
        stream,
        "udp",
        endpoint(flow.source),
        host,
        port,
        flow.bytes_out,
        flow.bytes_in,
        age,
    )

"""UDP flows in-process: the Link's datagram routing and dropping, the agent's flow objects.

The agent process itself, with real sockets, is driven in test_main.py.
"""

import asyncio
import logging
from typing import Any, Coroutine, List, Tuple

import pytest
from shuttle_agent.udp import (
    EARLY_DATAGRAMS,
    IDLE_ENV,
    IDLE_TIMEOUT,
    MAX_FLOWS,
    MAX_FLOWS_ENV,
    UdpFlow,
    settings_from_env,
)
from shuttle_ends.relay import PIPE_HIGH_WATER, Link
from shuttle_protocol.mux import AGENT, CLIENT, Mux
from shuttle_protocol.schema import Message
from shuttle_protocol.stream import StreamDecoder, encode
from shuttle_protocol.stream_messages import MAX_DATAGRAM, Close, Datagram, UdpOpen


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


def sent(link: Link) -> List[Message]:
    """What the Link queued for the pipe (no writer is attached: nothing else takes it)."""
    return StreamDecoder().feed(b"".join(link.mux.outgoing()))


class FakeFlow:
    """A client-side flow as the Link sees it: records what it is given."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, Any]] = []

    def on_datagram(self, msg: Datagram) -> None:
        self.calls.append(("datagram", msg))

    def on_close(self, msg: Close) -> None:
        self.calls.append(("close", msg))

    def reset(self) -> None:
        self.calls.append(("reset", None))


def unexpected(msg: Message) -> None:
    raise AssertionError(f"not for the session: {msg}")


def test_a_datagram_waits_for_no_pipe_it_is_dropped_and_counted() -> None:
    async def scenario() -> None:
        link = Link(Mux(CLIENT), unexpected, "agent")
        channel = link.mux.open_udp("192.0.2.53", 53)
        link.mux.outgoing()
        link.pause_writing()
        assert not link.send_datagram(channel, b"lost")
        assert link.datagrams_dropped == 1 and link.mux.buffered == 0
        link.resume_writing()
        assert link.send_datagram(channel, b"sent")
        assert sent(link) == [Datagram(channel, b"sent")]
        # Nor may datagrams pile up in the Mux within one loop iteration.
        for _ in range(PIPE_HIGH_WATER // MAX_DATAGRAM + 1):
            assert link.send_datagram(channel, b"x" * MAX_DATAGRAM)
        assert not link.send_datagram(channel, b"one too many")
        assert link.datagrams_dropped == 2
        link.finish("test over")

    run(scenario())


def test_datagram_and_close_go_to_the_flow_and_the_end_resets_the_rest() -> None:
    async def scenario() -> None:
        link = Link(Mux(CLIENT), unexpected, "agent")
        first, second = FakeFlow(), FakeFlow()
        link.flows[link.mux.open_udp("h", 1)] = first
        link.flows[link.mux.open_udp("h", 2)] = second
        link.data_received(
            encode(Datagram(1, b"a")) + encode(Datagram(2, b"")) + encode(Close(1, "refused"))
        )
        assert first.calls == [("datagram", Datagram(1, b"a")), ("close", Close(1, "refused"))]
        assert second.calls == [("datagram", Datagram(2, b""))]
        assert set(link.flows) == {2}
        link.data_received(encode(Datagram(1, b"late")))  # gone: dropped, no error
        assert link.failed is None and len(first.calls) == 2
        link.finish("test over")
        assert second.calls[-1] == ("reset", None)
        assert link.flows == {}

    run(scenario())


def agent_flow(link: Link) -> UdpFlow:
    """An agent-side flow whose socket is not set up (yet)."""
    assert link.mux.receive(encode(UdpOpen(1, "192.0.2.53", 53)))
    flow = UdpFlow(link, 1, IDLE_TIMEOUT)
    link.flows[1] = flow
    return flow


def test_datagrams_held_before_the_socket_exists_are_bounded() -> None:
    async def scenario() -> None:
        link = Link(Mux(AGENT), unexpected, "client")
        flow = agent_flow(link)
        for _ in range(EARLY_DATAGRAMS + 5):
            link.data_received(encode(Datagram(1, b"early")))
        assert flow.dropped == 5
        link.finish("test over")
        assert flow.closed

    run(scenario())


def test_a_flow_drops_while_its_socket_is_backed_up() -> None:
    class Transport(asyncio.DatagramTransport):
        def __init__(self) -> None:
            super().__init__()
            self.written: List[bytes] = []
            self.closing = False

        def sendto(self, data: Any, addr: Any = None) -> None:
            self.written.append(bytes(data))

        def is_closing(self) -> bool:
            return self.closing

        def close(self) -> None:
            self.closing = True

    async def scenario() -> None:
        link = Link(Mux(AGENT), unexpected, "client")
        flow = agent_flow(link)
        transport = Transport()
        flow.connection_made(transport)
        flow.on_datagram(Datagram(1, b"one"))
        flow.pause_writing()
        flow.on_datagram(Datagram(1, b"dropped"))
        flow.resume_writing()
        flow.on_datagram(Datagram(1, b"two"))
        assert transport.written == [b"one", b"two"]
        assert (flow.sent, flow.dropped) == (2, 1)
        flow.error_received(BlockingIOError(11, "try again"))  # one datagram lost, no more
        assert not flow.closed
        flow.error_received(ConnectionRefusedError(111, "Connection refused"))
        assert flow.closed and transport.closing and link.flows == {}
        assert sent(link) == [Close(1, "Connection refused")]
        link.finish("test over")

    run(scenario())


def test_settings_come_from_the_environment() -> None:
    assert settings_from_env({}) == (IDLE_TIMEOUT, MAX_FLOWS)
    assert settings_from_env({IDLE_ENV: "0.5", MAX_FLOWS_ENV: "3"}) == (0.5, 3)
    assert settings_from_env({MAX_FLOWS_ENV: "0"}) == (IDLE_TIMEOUT, 0)


@pytest.mark.parametrize("value", ["", "soon", "0", "-1", "nan", "inf", "1e400"])
def test_a_bad_idle_setting_is_ignored_with_a_warning(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "shuttle"):
        assert settings_from_env({IDLE_ENV: value}) == (IDLE_TIMEOUT, MAX_FLOWS)
    assert IDLE_ENV in caplog.text


@pytest.mark.parametrize("value", ["", "-1", "1.5", "many", "9" * 10, "\u0663", "\u00b2"])
def test_a_bad_flow_cap_is_ignored_with_a_warning(
    value: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "shuttle"):
        assert settings_from_env({MAX_FLOWS_ENV: value}) == (IDLE_TIMEOUT, MAX_FLOWS)
    assert MAX_FLOWS_ENV in caplog.text

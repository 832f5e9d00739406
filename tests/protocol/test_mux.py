"""The channel multiplexer over an in-memory pair: a client Mux and an agent Mux whose
outgoing() bytes are handed to the other's receive()."""

import random
from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shuttle_protocol.errors import LocalProtocolError, RemoteProtocolError
from shuttle_protocol.mux import AGENT, CLIENT, WINDOW, Mux
from shuttle_protocol.schema import Message
from shuttle_protocol.stream import encode
from shuttle_protocol.stream_messages import (
    MAX_CHANNEL,
    MAX_CREDIT,
    MAX_DATA,
    MAX_DATAGRAM,
    Close,
    Credit,
    Data,
    Datagram,
    Eof,
    Error,
    Hello,
    Open,
    Opened,
    Ping,
    Refused,
    UdpOpen,
    Welcome,
    Widen,
)

from .pair import Pair


def inject(mux: Mux, *msgs: Message) -> List[Message]:
    """Bytes a peer might send, whether or not a well-behaved Mux would."""
    return mux.receive(b"".join(encode(m) for m in msgs))


def payloads(msgs: List[Message]) -> List[bytes]:
    """The payloads of a list of messages that must all be Data."""
    assert all(isinstance(m, Data) for m in msgs)
    return [m.payload for m in msgs if isinstance(m, Data)]


# -- construction and opening -----------------------------------------------------------------


@pytest.mark.parametrize(
    "role, window",
    [("server", WINDOW), (CLIENT, MAX_DATA - 1), (AGENT, MAX_CREDIT + 1), (CLIENT, 0)],
)
def test_bad_construction_is_a_local_error(role: str, window: int) -> None:
    with pytest.raises(LocalProtocolError):
        Mux(role, window)


def test_only_the_client_opens_channels() -> None:
    with pytest.raises(LocalProtocolError):
        Mux(AGENT).open("example.org", 80)


def test_channel_ids_increase_and_are_never_reused() -> None:
    pair = Pair()
    first, second = pair.open(), pair.open()
    pair.client.close(second, "done")
    pair.to_agent()
    third = pair.open()
    assert (first, second, third) == (1, 2, 3)


def test_an_invalid_open_registers_no_channel() -> None:
    pair = Pair()
    with pytest.raises(LocalProtocolError):
        pair.client.open("example.org", 0)
    assert pair.client.channels == {}
    assert pair.client.buffered == 0


# -- lifecycles ----------------------------------------------------------------------------------


def test_data_flows_both_ways_in_order() -> None:
    pair = Pair()
    channel = pair.open()
    pair.client.send_data(channel, b"GET / ")
    pair.client.send_data(channel, memoryview(b"HTTP/1.0\r\n"))
    assert pair.to_agent() == [Data(channel, b"GET / "), Data(channel, b"HTTP/1.0\r\n")]
    pair.agent.send_data(channel, b"200 OK")
    assert pair.to_client() == [Data(channel, b"200 OK")]


@pytest.mark.parametrize("client_first", [True, False])
def test_a_channel_is_forgotten_after_eof_both_ways(client_first: bool) -> None:
    pair = Pair()
    channel = pair.open()
    first, second = (pair.client, pair.agent) if client_first else (pair.agent, pair.client)
    deliver_first = pair.to_agent if client_first else pair.to_client
    deliver_second = pair.to_client if client_first else pair.to_agent

    first.send_eof(channel)
    assert deliver_first() == [Eof(channel)]
    assert channel in first.channels and channel in second.channels
    assert second.credit(channel) > 0  # half close: the other way stays open
    second.send_data(channel, b"last words")
    second.send_eof(channel)
    assert channel not in second.channels  # Eof went both ways from its point of view
    assert deliver_second() == [Data(channel, b"last words"), Eof(channel)]
    assert channel not in first.channels
    first.send_eof(channel)  # a second Eof for a gone channel sends nothing
    assert first.buffered == 0


@pytest.mark.parametrize("closer", ["client", "agent"])
def test_a_channel_is_forgotten_after_close_either_way(closer: str) -> None:
    pair = Pair()
    channel = pair.open()
    if closer == "client":
        pair.client.close(channel, "reset")
        assert channel not in pair.client.channels
        assert pair.to_agent() == [Close(channel, "reset")]
    else:
        pair.agent.close(channel, "reset")
        assert channel not in pair.agent.channels
        assert pair.to_client() == [Close(channel, "reset")]
    assert pair.client.channels == {} and pair.agent.channels == {}
    pair.client.close(channel, "again")
    pair.agent.close(channel, "again")
    assert pair.client.buffered == 0 and pair.agent.buffered == 0


def test_a_long_close_reason_is_cut_not_refused() -> None:
    pair = Pair()
    channel = pair.open()
    pair.client.close(channel, "x" * 1000)
    assert pair.to_agent() == [Close(channel, "x" * 200)]


def test_a_refused_channel_is_forgotten() -> None:
    pair = Pair()
    channel = pair.client.open("example.org", 81)
    pair.to_agent()
    pair.agent.send(Refused(channel, 111, "Connection refused"))
    pair.agent.forget(channel)
    assert pair.to_client() == [Refused(channel, 111, "Connection refused")]
    assert pair.client.channels == {} and pair.agent.channels == {}


@pytest.mark.parametrize("msg", [Ping(3), Hello(1, ("tcp",), "3.8"), Welcome(1, ()), Error("x")])
def test_messages_without_a_channel_pass_through(msg: Message) -> None:
    pair = Pair()
    pair.client.send(msg)
    assert pair.to_agent() == [msg]
    pair.agent.send(msg)
    assert pair.to_client() == [msg]


def test_buffered_counts_what_outgoing_hands_over() -> None:
    pair = Pair()
    channel = pair.open()
    pair.client.send_data(channel, b"x" * 1000)
    pair.client.send(Ping(1))
    size = pair.client.buffered
    out = pair.client.outgoing()
    assert size == sum(len(b) for b in out) > 1000
    assert pair.client.buffered == 0 and pair.client.outgoing() == []


# -- late messages -------------------------------------------------------------------------------


def test_late_messages_for_a_channel_we_closed_are_dropped() -> None:
    pair = Pair()
    channel = pair.open()
    other = pair.open()
    pair.agent.send_data(channel, b"in flight")
    pair.agent.send(Credit(channel, 10))
    pair.agent.send_eof(channel)
    pair.agent.close(channel, "crossing")
    pair.agent.send_data(other, b"still here")
    pair.client.close(channel, "bye")
    assert pair.to_client() == [Data(other, b"still here")]
    assert pair.to_agent() == []  # the agent closed it too: our Close is late as well


def test_late_data_to_the_agent_for_a_channel_it_closed_is_dropped() -> None:
    pair = Pair()
    channel = pair.open()
    pair.client.send_data(channel, b"in flight")
    pair.client.send_eof(channel)
    pair.agent.close(channel, "gone")
    assert pair.to_agent() == []
    assert pair.to_client() == [Close(channel, "gone")]


# -- credit windows ------------------------------------------------------------------------------


def test_a_sender_cannot_exceed_its_credit() -> None:
    pair = Pair(window=MAX_DATA)
    channel = pair.open()
    with pytest.raises(LocalProtocolError):
        pair.client.send_data(channel, b"x" * (MAX_DATA + 1))
    assert pair.client.credit(channel) == MAX_DATA and pair.client.buffered == 0
    pair.client.send_data(channel, b"x" * (MAX_DATA - 1))
    pair.client.send_data(channel, b"x")
    assert pair.client.credit(channel) == 0
    size = pair.client.buffered
    with pytest.raises(LocalProtocolError):
        pair.client.send_data(channel, b"x")
    assert pair.client.buffered == size
    pair.client.send_data(channel, b"")  # nothing is always allowed


def test_each_channel_has_its_own_window() -> None:
    pair = Pair(window=MAX_DATA)
    bulk, interactive = pair.open(), pair.open()
    pair.client.send_data(bulk, b"x" * MAX_DATA)
    assert pair.client.credit(bulk) == 0
    assert pair.client.credit(interactive) == MAX_DATA
    pair.client.send_data(interactive, b"ls\n")
    assert pair.to_agent()[-1] == Data(interactive, b"ls\n")


def test_data_is_sent_in_pieces_of_at_most_max_data() -> None:
    pair = Pair(window=4 * MAX_DATA)
    channel = pair.open()
    payload = bytes(range(256)) * (2 * MAX_DATA // 256 + 3)
    pair.client.send_data(channel, payload)
    out = pair.to_agent()
    assert [len(p) for p in payloads(out)] == [MAX_DATA, MAX_DATA, 768]
    assert b"".join(payloads(out)) == payload


def test_no_data_after_our_eof_or_on_a_gone_channel() -> None:
    pair = Pair()
    channel = pair.open()
    pair.client.send_eof(channel)
    assert pair.client.credit(channel) == 0
    with pytest.raises(LocalProtocolError):
        pair.client.send_data(channel, b"x")
    for gone in (channel + 1, 0):
        assert pair.client.credit(gone) == 0
        with pytest.raises(LocalProtocolError):
            pair.client.send_data(gone, b"x")


def test_credit_is_granted_for_delivered_bytes_once_per_outgoing() -> None:
    window = 4 * MAX_DATA
    pair = Pair(window=window)
    channel = pair.open()
    pair.client.send_data(channel, b"x" * window)
    assert pair.client.in_flight == window
    assert len(b"".join(payloads(pair.to_agent()))) == window
    assert not pair.agent.has_output  # received is not delivered: no credit yet
    pair.agent.delivered(channel, 1)
    pair.agent.delivered(channel, 99)
    assert pair.agent.has_output and pair.agent.buffered == 0  # a grant, not yet bytes
    assert pair.to_client() == [Credit(channel, 100)]  # one Credit for both deliveries
    assert pair.client.credit(channel) == 100
    assert pair.client.in_flight == window - 100
    pair.agent.delivered(channel, window - 100)
    assert pair.to_client() == [Credit(channel, window - 100)]
    assert pair.client.credit(channel) == window
    assert pair.client.in_flight == 0
    assert not pair.agent.has_output


def test_in_flight_counts_every_channel_until_granted_eof_or_close() -> None:
    pair = Pair()
    one, two, three = pair.open(), pair.open(), pair.open()
    for channel in (one, two, three):
        pair.client.send_data(channel, b"x" * 1000)
    assert pair.client.in_flight == 3000
    pair.to_agent()
    pair.agent.delivered(one, 1000)
    pair.to_client()
    assert pair.client.in_flight == 2000
    pair.client.send_eof(two)  # the agent grants nothing after our Eof: not counted
    assert pair.client.in_flight == 1000
    pair.client.close(three, "done")
    assert pair.client.in_flight == 0
    pair.agent.delivered(two, 1000)  # a grant sent before our Eof arrived is not counted
    assert pair.to_client() == [Credit(two, 1000)]
    assert pair.client.in_flight == 0


def test_in_flight_drops_when_the_peer_closes_or_is_forgotten() -> None:
    pair = Pair()
    one, two = pair.open(), pair.open()
    pair.client.send_data(one, b"x" * 500)
    pair.client.send_data(two, b"x" * 700)
    pair.agent.send(Close(one, "reset"))
    pair.to_client()
    assert pair.client.in_flight == 700
    pair.client.forget(two)
    assert pair.client.in_flight == 0


def test_no_credit_is_granted_after_the_peers_eof() -> None:
    pair = Pair(window=MAX_DATA)
    channel = pair.open()
    pair.client.send_data(channel, b"x" * MAX_DATA)
    pair.client.send_eof(channel)
    pair.to_agent()
    pair.agent.delivered(channel, MAX_DATA)
    assert pair.agent.buffered == 0


def test_delivered_for_a_gone_channel_is_ignored() -> None:
    pair = Pair()
    channel = pair.open()
    pair.client.send_data(channel, b"x" * 100)
    pair.to_agent()
    pair.agent.close(channel, "done")
    pair.agent.outgoing()
    pair.agent.delivered(channel, 100)
    pair.agent.delivered(999, 1)
    assert pair.agent.buffered == 0


@pytest.mark.parametrize("count", [101, -1])
def test_delivering_bytes_never_received_is_a_local_error(count: int) -> None:
    # Otherwise the peer would get credit for bytes still in our buffers, or never sent.
    pair = Pair(window=MAX_DATA)
    channel = pair.open()
    pair.client.send_data(channel, b"x" * 100)
    pair.to_agent()
    with pytest.raises(LocalProtocolError):
        pair.agent.delivered(channel, count)
    pair.agent.delivered(channel, 100)


# -- a misbehaving peer --------------------------------------------------------------------------


def agent_with_channel(window: int = MAX_DATA) -> Mux:
    agent = Mux(AGENT, window)
    assert inject(agent, Open(1, "h", 1)) == [Open(1, "h", 1)]
    return agent


def client_with_channel(window: int = MAX_DATA) -> Mux:
    client = Mux(CLIENT, window)
    client.open("h", 1)
    client.outgoing()
    return client


def test_data_beyond_the_window_is_a_remote_error() -> None:
    agent = agent_with_channel()
    inject(agent, Data(1, b"x" * (MAX_DATA - 10)))
    with pytest.raises(RemoteProtocolError, match="window"):
        inject(agent, Data(1, b"x" * 11))


def test_data_within_a_granted_window_is_accepted() -> None:
    agent = agent_with_channel()
    inject(agent, Data(1, b"x" * MAX_DATA))
    agent.delivered(1, MAX_DATA)
    agent.outgoing()  # the grant
    assert inject(agent, Data(1, b"x" * MAX_DATA)) == [Data(1, b"x" * MAX_DATA)]
    with pytest.raises(RemoteProtocolError):
        inject(agent, Data(1, b"x"))


def test_data_after_eof_is_a_remote_error() -> None:
    agent = agent_with_channel()
    inject(agent, Eof(1))
    with pytest.raises(RemoteProtocolError, match="after Eof"):
        inject(agent, Data(1, b"x"))


def test_eof_twice_is_a_remote_error() -> None:
    client = client_with_channel()
    inject(client, Eof(1))
    with pytest.raises(RemoteProtocolError, match="twice"):
        inject(client, Eof(1))


@pytest.mark.parametrize("second", [1, 2])
def test_an_open_that_reuses_an_id_is_a_remote_error(second: int) -> None:
    agent = Mux(AGENT)
    inject(agent, Open(2, "h", 1))
    with pytest.raises(RemoteProtocolError, match="reuses"):
        inject(agent, Open(second, "h", 1))


def test_an_open_for_a_closed_id_is_a_remote_error() -> None:
    agent = agent_with_channel()
    inject(agent, Close(1, ""))
    with pytest.raises(RemoteProtocolError):
        inject(agent, Open(1, "h", 1))


def test_channel_ids_can_run_out() -> None:
    agent = Mux(AGENT)
    inject(agent, Open(MAX_CHANNEL - 1, "h", 1))
    with pytest.raises(RemoteProtocolError):
        inject(agent, Open(MAX_CHANNEL, "h", 1))


@pytest.mark.parametrize("msg", [Opened(1), Refused(1, 1, "")], ids=lambda m: type(m).__name__)
def test_opened_or_refused_sent_to_the_agent_is_a_remote_error(msg: Message) -> None:
    with pytest.raises(RemoteProtocolError, match="to the agent"):
        inject(agent_with_channel(), msg)


def test_open_sent_to_the_client_is_a_remote_error() -> None:
    with pytest.raises(RemoteProtocolError, match="to the client"):
        inject(Mux(CLIENT), Open(1, "h", 1))


def channel_messages(channel: int) -> List[Message]:
    return [
        Data(channel, b"x"),
        Credit(channel, 1),
        Widen(channel, 1),
        Eof(channel),
        Close(channel, ""),
        Datagram(channel, b"x"),
    ]


# Channel 2 is the next id the client would use; channel 2**40 is far beyond it.
NEVER_OPENED = [m for channel in (2, 2**40) for m in channel_messages(channel)]


def name(msg: Message) -> str:
    return f"{type(msg).__name__}({getattr(msg, 'channel', '')})"


@pytest.mark.parametrize(
    "msg", [*NEVER_OPENED, Opened(2), Refused(2, 1, ""), Opened(2**40)], ids=name
)
def test_the_client_refuses_messages_for_channels_it_never_opened(msg: Message) -> None:
    with pytest.raises(RemoteProtocolError, match="never opened"):
        inject(client_with_channel(), msg)


@pytest.mark.parametrize("msg", NEVER_OPENED, ids=name)
def test_the_agent_refuses_messages_for_channels_never_opened(msg: Message) -> None:
    with pytest.raises(RemoteProtocolError, match="never opened"):
        inject(agent_with_channel(), msg)


@pytest.mark.parametrize("msg", channel_messages(1), ids=name)
def test_the_client_refuses_messages_before_opening_anything(msg: Message) -> None:
    with pytest.raises(RemoteProtocolError, match="never opened"):
        inject(Mux(CLIENT), msg)


def test_credit_for_bytes_never_sent_is_a_remote_error() -> None:
    client = client_with_channel()
    client.send_data(1, b"x" * 100)
    inject(client, Credit(1, 100))
    assert client.in_flight == 0
    with pytest.raises(RemoteProtocolError, match="never sent"):
        inject(client, Credit(1, 1))


def test_widening_beyond_the_maximum_is_a_remote_error() -> None:
    client = client_with_channel()
    inject(client, Widen(1, MAX_CREDIT - MAX_DATA))
    assert client.credit(1) == MAX_CREDIT
    with pytest.raises(RemoteProtocolError, match="beyond"):
        inject(client, Widen(1, 1))


def test_after_a_remote_error_the_mux_refuses_further_input() -> None:
    agent = agent_with_channel()
    with pytest.raises(RemoteProtocolError):
        inject(agent, Eof(1), Eof(1))
    for msg in (Ping(1), Data(1, b"x")):
        with pytest.raises(RemoteProtocolError):
            inject(agent, msg)


def test_after_a_decoding_error_the_mux_refuses_further_input() -> None:
    client = client_with_channel()
    with pytest.raises(RemoteProtocolError):
        client.receive(b"\xc1")
    with pytest.raises(RemoteProtocolError):
        inject(client, Ping(1))


# -- UDP channels --------------------------------------------------------------------------------


def test_datagrams_flow_both_ways_in_order() -> None:
    pair = Pair()
    channel = pair.open_udp()
    pair.client.send_datagram(channel, b"query")
    pair.client.send_datagram(channel, memoryview(b"again"))
    pair.client.send_datagram(channel, b"")
    assert pair.to_agent() == [
        Datagram(channel, b"query"),
        Datagram(channel, b"again"),
        Datagram(channel, b""),
    ]
    pair.agent.send_datagram(channel, b"answer")
    pair.agent.send_datagram(channel, b"")
    assert pair.to_client() == [Datagram(channel, b"answer"), Datagram(channel, b"")]
    assert channel in pair.client.datagram_channels and channel in pair.agent.datagram_channels
    assert pair.client.channels == {} and pair.agent.channels == {}  # no stream state


def test_udp_and_tcp_channels_share_one_id_sequence() -> None:
    pair = Pair()
    ids = [pair.open(), pair.open_udp(), pair.open(), pair.open_udp()]
    assert ids == [1, 2, 3, 4]
    assert set(pair.client.channels) == set(pair.agent.channels) == {1, 3}
    assert pair.client.datagram_channels == pair.agent.datagram_channels == {2, 4}


def test_datagrams_need_no_credit_and_grant_none() -> None:
    pair = Pair(window=MAX_DATA)
    tcp, udp = pair.open(), pair.open_udp()
    assert pair.client.credit(udp) == 0
    big = b"d" * MAX_DATAGRAM
    for _ in range(2 * MAX_DATA // MAX_DATAGRAM + 1):  # more than a window's worth
        pair.client.send_datagram(udp, big)
        pair.agent.send_datagram(udp, big)
    assert all(m == Datagram(udp, big) for m in pair.to_agent())
    assert all(m == Datagram(udp, big) for m in pair.to_client())
    pair.agent.delivered(udp, 10)  # nothing to account for: no Credit
    assert not pair.agent.has_output and not pair.client.has_output
    assert pair.client.credit(tcp) == MAX_DATA  # the TCP window did not move
    assert pair.agent.credit(tcp) == MAX_DATA


@pytest.mark.parametrize("closer", ["client", "agent"])
def test_a_udp_channel_is_forgotten_after_close_either_way(closer: str) -> None:
    pair = Pair()
    channel = pair.open_udp()
    if closer == "client":
        pair.client.close(channel, "expired")
        assert pair.to_agent() == [Close(channel, "expired")]
    else:
        pair.agent.close(channel, "Connection refused")
        assert pair.to_client() == [Close(channel, "Connection refused")]
    assert not pair.client.datagram_channels and not pair.agent.datagram_channels
    pair.client.close(channel, "again")
    pair.agent.close(channel, "again")
    assert pair.client.buffered == 0 and pair.agent.buffered == 0
    with pytest.raises(LocalProtocolError):
        pair.client.send_datagram(channel, b"x")


def test_a_refused_udp_channel_is_forgotten() -> None:
    pair = Pair()
    channel = pair.open_udp()
    pair.agent.forget(channel)
    pair.agent.send(Refused(channel, 0, "cannot resolve"))
    assert pair.to_client() == [Refused(channel, 0, "cannot resolve")]
    assert not pair.client.datagram_channels and not pair.agent.datagram_channels


def test_late_datagrams_for_a_closed_udp_channel_are_dropped() -> None:
    pair = Pair()
    channel, other = pair.open_udp(), pair.open_udp()
    pair.agent.send_datagram(channel, b"in flight")
    pair.agent.close(channel, "idle")
    pair.client.send_datagram(channel, b"crossing")
    pair.client.close(channel, "expired")
    pair.client.send_datagram(other, b"still here")
    assert pair.to_client() == []
    assert pair.to_agent() == [Datagram(other, b"still here")]


def test_only_the_client_opens_udp_channels() -> None:
    with pytest.raises(LocalProtocolError):
        Mux(AGENT).open_udp("192.0.2.53", 53)


def test_an_invalid_udp_open_registers_nothing() -> None:
    client = Mux(CLIENT)
    with pytest.raises(LocalProtocolError):
        client.open_udp("192.0.2.53", 0)
    assert not client.datagram_channels and client.buffered == 0


def test_stream_calls_on_a_udp_channel_are_local_errors() -> None:
    pair = Pair()
    channel = pair.open_udp()
    with pytest.raises(LocalProtocolError, match="UDP"):
        pair.client.send_data(channel, b"x")
    with pytest.raises(LocalProtocolError, match="UDP"):
        pair.client.send_eof(channel)
    assert pair.client.buffered == 0


def test_datagrams_on_a_tcp_or_gone_channel_are_local_errors() -> None:
    pair = Pair()
    tcp, udp = pair.open(), pair.open_udp()
    for channel in (tcp, udp + 1, 0):
        with pytest.raises(LocalProtocolError):
            pair.client.send_datagram(channel, b"x")
    with pytest.raises(LocalProtocolError):
        pair.client.send_datagram(udp, b"x" * (MAX_DATAGRAM + 1))
    assert pair.client.buffered == 0


@pytest.mark.parametrize(
    "msg",
    [Data(1, b"x"), Credit(1, 1), Widen(1, 1), Eof(1), Opened(1)],
    ids=lambda m: type(m).__name__,
)
def test_stream_messages_on_a_udp_channel_are_remote_errors(msg: Message) -> None:
    client = Mux(CLIENT)
    client.open_udp("h", 1)
    with pytest.raises(RemoteProtocolError, match="on a UDP channel"):
        inject(client, msg)
    if not isinstance(msg, Opened):
        agent = Mux(AGENT)
        inject(agent, UdpOpen(1, "h", 1))
        with pytest.raises(RemoteProtocolError, match="on a UDP channel"):
            inject(agent, msg)


@pytest.mark.parametrize("side", [CLIENT, AGENT])
def test_a_datagram_on_a_tcp_channel_is_a_remote_error(side: str) -> None:
    mux = client_with_channel() if side == CLIENT else agent_with_channel()
    with pytest.raises(RemoteProtocolError, match="Datagram on a TCP channel"):
        inject(mux, Datagram(1, b"x"))


def test_udp_open_sent_to_the_client_is_a_remote_error() -> None:
    with pytest.raises(RemoteProtocolError, match="UdpOpen sent to the client"):
        inject(Mux(CLIENT), UdpOpen(1, "h", 1))


@pytest.mark.parametrize(
    "first", [Open(2, "h", 1), UdpOpen(2, "h", 1)], ids=lambda m: type(m).__name__
)
@pytest.mark.parametrize("second", [1, 2])
def test_a_udp_open_that_reuses_any_id_is_a_remote_error(first: Message, second: int) -> None:
    agent = Mux(AGENT)
    inject(agent, first)
    with pytest.raises(RemoteProtocolError, match="UdpOpen reuses"):
        inject(agent, UdpOpen(second, "h", 1))
    agent = Mux(AGENT)
    inject(agent, first)
    if isinstance(first, UdpOpen):
        with pytest.raises(RemoteProtocolError, match="Open reuses"):
            inject(agent, Open(second, "h", 1))


def test_a_datagram_for_a_udp_channel_never_opened_is_a_remote_error() -> None:
    client = Mux(CLIENT)
    client.open_udp("h", 1)
    with pytest.raises(RemoteProtocolError, match="never opened"):
        inject(client, Datagram(2, b"x"))


# -- random interleavings ------------------------------------------------------------------------

PATTERN = bytes(range(251)) * (4 * MAX_DATA // 251 + 2)


def pattern(offset: int, size: int) -> bytes:
    start = offset % 251
    return PATTERN[start : start + size]


SIDES = (CLIENT, AGENT)
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("send"),
            st.sampled_from(SIDES),
            st.integers(0, 2),
            st.integers(0, 2 * MAX_DATA),
        ),
        st.tuples(
            st.just("deliver"), st.sampled_from(SIDES), st.integers(0, 2), st.integers(0, MAX_DATA)
        ),
        st.tuples(st.just("pump"), st.sampled_from(SIDES), st.just(0), st.integers(0, 10**6)),
        st.tuples(st.just("eof"), st.sampled_from(SIDES), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("datagram"), st.sampled_from(SIDES), st.just(0), st.integers(0, 3000)),
    ),
    max_size=60,
)


class Model:
    """What each side sent, received and delivered per channel, and the bytes in flight."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.pair = Pair(window)
        self.channels = [self.pair.open() for _ in range(3)]
        self.mux = {CLIENT: self.pair.client, AGENT: self.pair.agent}
        self.peer = {CLIENT: AGENT, AGENT: CLIENT}
        self.sent: Dict[Tuple[str, int], int] = {}
        self.got: Dict[Tuple[str, int], bytearray] = {}
        self.delivered: Dict[Tuple[str, int], int] = {}
        self.eof: Dict[Tuple[str, int], bool] = {}
        for side in SIDES:
            for channel in self.channels:
                key = (side, channel)
                self.sent[key] = self.delivered[key] = 0
                self.got[key] = bytearray()
                self.eof[key] = False
        self.wire = {CLIENT: b"", AGENT: b""}  # bytes written by side, not yet read
        # A UDP flow beside the TCP channels: its datagrams must not disturb their windows.
        self.udp = self.pair.open_udp()
        self.datagrams_sent: Dict[str, List[bytes]] = {CLIENT: [], AGENT: []}
        self.datagrams_got: Dict[str, List[bytes]] = {CLIENT: [], AGENT: []}

    def datagram(self, side: str, size: int) -> None:
        payload = pattern(len(self.datagrams_sent[side]), size)
        self.mux[side].send_datagram(self.udp, payload)
        self.datagrams_sent[side].append(payload)

    def send(self, side: str, channel: int, size: int) -> None:
        mux = self.mux[side]
        key = (side, channel)
        if not self.eof[key] and size <= mux.credit(channel):
            mux.send_data(channel, pattern(self.sent[key], size))
            self.sent[key] += size
        else:
            before = (mux.credit(channel), mux.buffered)
            with pytest.raises(LocalProtocolError):
                mux.send_data(channel, pattern(self.sent[key], size))
            assert (mux.credit(channel), mux.buffered) == before

    def deliver(self, side: str, channel: int, size: int) -> None:
        key = (side, channel)
        size = min(size, len(self.got[key]) - self.delivered[key])
        self.mux[side].delivered(channel, size)
        self.delivered[key] += size

    def pump(self, side: str, cut: Optional[int]) -> None:
        """Move a prefix of what side wrote (cut anywhere; None: all of it) to its peer."""
        self.wire[side] += b"".join(self.mux[side].outgoing())
        cut = len(self.wire[side]) if cut is None else cut % (len(self.wire[side]) + 1)
        chunk, self.wire[side] = self.wire[side][:cut], self.wire[side][cut:]
        receiver = self.peer[side]
        for msg in self.mux[receiver].receive(chunk):
            if isinstance(msg, Data):
                self.got[(receiver, msg.channel)] += msg.payload
            elif isinstance(msg, Datagram):
                assert msg.channel == self.udp
                self.datagrams_got[receiver].append(msg.payload)

    def eof_op(self, side: str, channel: int) -> None:
        self.mux[side].send_eof(channel)
        self.eof[(side, channel)] = True

    def check(self) -> None:
        for side in SIDES:
            mux = self.mux[side]
            sent = self.datagrams_sent[self.peer[side]]
            assert self.datagrams_got[side] == sent[: len(self.datagrams_got[side])]
            for channel in self.channels:
                key = (side, channel)
                got = self.got[key]
                assert got == pattern(0, len(got))  # byte-exact and in order
                assert len(got) <= self.sent[(self.peer[side], channel)]
                held = len(got) - self.delivered[key]
                assert 0 <= held <= self.window
                state = mux.channels.get(channel)
                if state is not None:
                    assert 0 <= state.recv_left <= self.window
                    assert 0 <= state.send_credit <= self.window
                    assert held + state.unacked + state.recv_left == self.window
            # Bytes in flight: what each open channel sent and was not granted back yet.
            assert mux.in_flight == sum(
                self.window - state.send_credit
                for state in mux.channels.values()
                if not state.eof_sent
            )

    def settle(self) -> None:
        """Deliver everything everywhere until nothing moves."""
        for _ in range(20):
            for side in SIDES:
                self.pump(side, None)
            for side in SIDES:
                for channel in self.channels:
                    self.deliver(side, channel, 10**12)
            if not any(self.wire.values()) and not any(m.has_output for m in self.mux.values()):
                assert all(m.in_flight == 0 for m in self.mux.values())
                return
        raise AssertionError("the pair never settled")


@given(operations)
@settings(max_examples=150, deadline=None)
def test_random_interleavings_keep_both_windows_consistent(
    ops: List[Tuple[str, str, int, int]],
) -> None:
    model = Model(window=2 * MAX_DATA)
    for op, side, index, size in ops:
        channel = model.channels[index]
        if op == "send":
            model.send(side, channel, size)
        elif op == "deliver":
            model.deliver(side, channel, size)
        elif op == "pump":
            model.pump(side, size)
        elif op == "datagram":
            model.datagram(side, size)
        else:
            model.eof_op(side, channel)
        model.check()
    model.settle()
    model.check()
    for side in SIDES:
        peer = model.peer[side]
        assert model.datagrams_got[peer] == model.datagrams_sent[side]
        for channel in model.channels:
            assert len(model.got[(peer, channel)]) == model.sent[(side, channel)]
            sender, receiver = model.mux[side], model.mux[peer]
            gone = channel not in sender.channels or channel not in receiver.channels
            assert gone == (model.eof[(side, channel)] and model.eof[(peer, channel)])
            if not gone and not model.eof[(side, channel)]:
                state = receiver.channels[channel]
                assert sender.credit(channel) == state.recv_left
                assert sender.credit(channel) + state.unacked == model.window


# -- bulk ----------------------------------------------------------------------------------------


def test_a_bulk_transfer_both_ways_arrives_byte_exact() -> None:
    size = 6 * 1024 * 1024
    rng = random.Random(7)
    pair = Pair()
    channels = [pair.open(), pair.open()]
    payload = {
        (side, channel): rng.getrandbits(8 * size).to_bytes(size, "little")
        for side in SIDES
        for channel in channels
    }
    offset = {key: 0 for key in payload}
    got = {key: bytearray() for key in payload}
    mux = {CLIENT: pair.client, AGENT: pair.agent}
    peer = {CLIENT: AGENT, AGENT: CLIENT}
    for _ in range(10_000):
        if all(offset[key] == size for key in payload) and not (
            pair.client.buffered or pair.agent.buffered
        ):
            break
        for (side, channel), data in payload.items():
            n = min(mux[side].credit(channel), size - offset[(side, channel)])
            n = min(n, rng.randrange(1, 3 * MAX_DATA))
            if not n:
                continue
            start = offset[(side, channel)]
            mux[side].send_data(channel, memoryview(data)[start : start + n])
            offset[(side, channel)] += n
            if offset[(side, channel)] == size:
                mux[side].send_eof(channel)
        for side in SIDES:
            wire = b"".join(mux[side].outgoing())
            for msg in mux[peer[side]].receive(wire):
                if isinstance(msg, Data):
                    got[(side, msg.channel)] += msg.payload
                    mux[peer[side]].delivered(msg.channel, len(msg.payload))
    else:
        raise AssertionError("the transfer stalled")
    for key, data in payload.items():
        assert got[key] == data, key
    assert pair.client.channels == {} and pair.agent.channels == {}

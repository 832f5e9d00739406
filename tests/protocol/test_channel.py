"""A channel's life as transcripts: half-close each way, close while connecting, reset,
credit and the socket's write buffer (shuttle_protocol.channel, through tests/protocol/playbook)."""

from shuttle_protocol.channel import Do, Write
from shuttle_protocol.stream_messages import MAX_DATA, Close, Credit, Data, Eof

from .playbook import (
    CHANNEL,
    Congested,
    Connect,
    FromPeer,
    LocalData,
    LocalEof,
    Lost,
    PauseWriting,
    Playbook,
    Reset,
    ResumeWriting,
    Sent,
)


def test_half_close_by_the_local_program() -> None:
    # Our Eof goes, the socket stays open for the peer's bytes; its Eof closes the socket.
    playbook = (
        Playbook()
        >> LocalData(b"request")
        << Sent(Data(CHANNEL, b"request"))
        >> LocalEof()
        << Sent(Eof(CHANNEL))
        >> FromPeer(Data(CHANNEL, b"answer"))
        << Write(b"answer")
        << Sent(Credit(CHANNEL, 6))
        >> FromPeer(Eof(CHANNEL))
        << Do.CLOSE
    )
    assert playbook.actual() == playbook.expected()
    assert not playbook.channel.half_open


def test_half_close_by_the_peer() -> None:
    # The peer's Eof shuts our write side only; the program may still send, then its EOF
    # ends the channel (no Close: both EOFs went through).
    playbook = (
        Playbook()
        >> FromPeer(Eof(CHANNEL))
        << Do.SHUT_WRITE
        >> LocalData(b"more")
        << Sent(Data(CHANNEL, b"more"))
        >> LocalEof()
        << Do.CLOSE
        << Sent(Eof(CHANNEL))
        >> Lost()
    )
    assert playbook.actual() == playbook.expected()


def test_close_while_connecting() -> None:
    # The agent holds what comes before its connect completes; a Close then resets the
    # socket as soon as it is there, and nothing early is written to it.
    playbook = (
        Playbook(agent=True)
        >> FromPeer(Data(CHANNEL, b"early"))
        >> FromPeer(Close(CHANNEL, "client gave up"))
        >> Connect()
        << Do.RESET
    )
    assert playbook.actual() == playbook.expected()


def test_early_data_and_eof_wait_for_the_connect() -> None:
    playbook = (
        Playbook(agent=True)
        >> FromPeer(Data(CHANNEL, b"GET /"))
        >> FromPeer(Eof(CHANNEL))
        >> Connect()
        << Write(b"GET /")
        << Do.SHUT_WRITE
    )
    assert playbook.actual() == playbook.expected()


def test_a_lost_socket_resets_the_peer_unless_both_eofs_went() -> None:
    playbook = (
        Playbook()
        >> LocalEof()
        << Sent(Eof(CHANNEL))
        >> Lost("socket closed: [Errno 104] Connection reset by peer")
        << Sent(Close(CHANNEL, "socket closed: [Errno 104] Connection reset by peer"))
    )
    assert playbook.actual() == playbook.expected()


def test_a_peer_close_resets_the_socket_and_ends_the_channel() -> None:
    playbook = (
        Playbook()
        >> FromPeer(Close(CHANNEL, "connection reset by the remote host"))
        << Do.RESET
        >> LocalData(b"late")  # read before the abort took effect: held, never sent
        << Do.PAUSE_READING
        >> Lost()
    )
    assert playbook.actual() == playbook.expected()


def test_a_reset_by_the_driver_tells_the_peer_nothing() -> None:
    # The session ends, or the remote connect was refused: the peer knows already.
    playbook = Playbook() >> Reset() << Do.RESET >> Lost()
    assert playbook.actual() == playbook.expected()


def test_bytes_beyond_the_credit_are_held_and_the_socket_stops() -> None:
    window = MAX_DATA
    read = b"a" * window + b"b" * 100
    playbook = (
        Playbook(window=window)
        >> LocalData(read)
        << Do.PAUSE_READING
        << Sent(Data(CHANNEL, b"a" * window))
        >> LocalEof()  # held bytes first: no Eof yet
        >> FromPeer(Credit(CHANNEL, 60))
        << Sent(Data(CHANNEL, b"b" * 60))
        >> FromPeer(Credit(CHANNEL, 60))
        << Sent(Data(CHANNEL, b"b" * 40))
        << Sent(Eof(CHANNEL))
    )
    assert playbook.actual() == playbook.expected()


def test_credit_back_resumes_reading() -> None:
    window = MAX_DATA
    playbook = (
        Playbook(window=window)
        >> LocalData(b"x" * window)
        << Do.PAUSE_READING
        << Sent(Data(CHANNEL, b"x" * window))
        >> FromPeer(Credit(CHANNEL, 10))
        << Do.RESUME_READING
        >> LocalData(b"y" * 10)
        << Do.PAUSE_READING
        << Sent(Data(CHANNEL, b"y" * 10))
    )
    assert playbook.actual() == playbook.expected()


def test_a_congested_link_stalls_the_channel_until_it_clears() -> None:
    playbook = (
        Playbook()
        >> Congested(True)
        >> LocalData(b"z")
        << Do.PAUSE_READING
        << Do.STALL
        << Sent(Data(CHANNEL, b"z"))
        >> Congested(True)  # the link asks again, still congested: stalled again
        << Do.STALL
        >> Congested(False)
        << Do.RESUME_READING
    )
    assert playbook.actual() == playbook.expected()


def test_credit_comes_back_only_once_the_socket_took_the_bytes() -> None:
    playbook = (
        Playbook()
        >> PauseWriting()
        >> FromPeer(Data(CHANNEL, b"bulk"))
        << Write(b"bulk")
        >> ResumeWriting()
        << Sent(Credit(CHANNEL, 4))
    )
    assert playbook.actual() == playbook.expected()

"""The ssh ControlMaster codec (shuttle_client.ssh_mux): requests as mux.c reads them, the
master's answers as mux.c writes them, and any bytes at all into the decoder."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from shuttle_client import ssh_mux
from shuttle_protocol.errors import LocalProtocolError, RemoteProtocolError


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def string(value: bytes) -> bytes:
    return u32(len(value)) + value


def packet(kind: int, body: bytes) -> bytes:
    """A packet as mux.c's buffer_put_string of (type, body) writes it."""
    return string(u32(kind) + body)


ANSWERS = st.one_of(
    st.builds(ssh_mux.Hello, st.integers(0, ssh_mux.UINT32)),
    st.builds(ssh_mux.SessionOpened, st.integers(0, ssh_mux.UINT32), st.integers(0, 2**31)),
    st.builds(ssh_mux.Alive, st.integers(0, ssh_mux.UINT32), st.integers(1, 2**22)),
    st.builds(ssh_mux.Ok, st.integers(0, ssh_mux.UINT32)),
    st.builds(ssh_mux.ExitMessage, st.integers(0, ssh_mux.UINT32), st.integers(0, 255)),
    st.builds(ssh_mux.Failure, st.integers(0, ssh_mux.UINT32), st.text(max_size=300)),
    st.builds(ssh_mux.PermissionDenied, st.integers(0, ssh_mux.UINT32), st.text(max_size=30)),
)


def wire(answer: ssh_mux.Answer) -> bytes:
    """An answer's bytes, written here field by field as the master does."""
    if isinstance(answer, ssh_mux.Hello):
        return packet(answer.TYPE, u32(answer.version))
    if isinstance(answer, ssh_mux.SessionOpened):
        return packet(answer.TYPE, u32(answer.request_id) + u32(answer.session_id))
    if isinstance(answer, ssh_mux.Alive):
        return packet(answer.TYPE, u32(answer.request_id) + u32(answer.pid))
    if isinstance(answer, ssh_mux.Ok):
        return packet(answer.TYPE, u32(answer.request_id))
    if isinstance(answer, ssh_mux.ExitMessage):
        return packet(answer.TYPE, u32(answer.session_id) + u32(answer.status))
    return packet(answer.TYPE, u32(answer.request_id) + string(answer.reason.encode()))


def test_requests_are_what_mux_c_reads() -> None:
    assert ssh_mux.encode(ssh_mux.Hello(4)) == packet(0x00000001, u32(4))
    assert ssh_mux.encode(ssh_mux.AliveCheck(9)) == packet(0x10000004, u32(9))
    # request id, reserved string, connect host string, connect port as uint32
    assert ssh_mux.encode(ssh_mux.NewStdioFwd(3, "10.1.2.3", 8080)) == packet(
        0x10000008, u32(3) + string(b"") + string(b"10.1.2.3") + u32(8080)
    )
    # request id, reserved string, tty, X11, agent, subsystem flags and the escape character
    # as uint32s (no escape: 0xffffffff), terminal type, command; no environment
    flags = u32(0) * 4 + u32(0xFFFFFFFF)
    assert ssh_mux.encode(ssh_mux.NewSession(5, "exec python3 -c x")) == packet(
        0x10000002, u32(5) + string(b"") + flags + string(b"") + string(b"exec python3 -c x")
    )
    # request id, forward type (local: 1), listen host, listen port, connect host and port,
    # the ports as uint32s (process_mux_open_fwd)
    assert ssh_mux.encode(ssh_mux.OpenLocalFwd(7, "127.0.0.1", 40123, "10.1.2.3", 80)) == packet(
        0x10000006,
        u32(7) + u32(1) + string(b"127.0.0.1") + u32(40123) + string(b"10.1.2.3") + u32(80),
    )
    # the same fields, to close it (process_mux_close_fwd)
    assert ssh_mux.encode(ssh_mux.CloseLocalFwd(8, "::1", 40124, "fd00::3", 443)) == packet(
        0x10000007, u32(8) + u32(1) + string(b"::1") + u32(40124) + string(b"fd00::3") + u32(443)
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: ssh_mux.NewStdioFwd(1, "", 80),
        lambda: ssh_mux.NewStdioFwd(1, "a" * 1026, 80),
        lambda: ssh_mux.NewStdioFwd(1, "a\0b", 80),
        lambda: ssh_mux.NewStdioFwd(1, "host", 0),
        lambda: ssh_mux.NewStdioFwd(1, "host", 65536),
        lambda: ssh_mux.NewStdioFwd(-1, "host", 80),
        lambda: ssh_mux.NewStdioFwd(2**32, "host", 80),
        lambda: ssh_mux.AliveCheck(True),
        lambda: ssh_mux.OpenLocalFwd(1, "", 40000, "host", 80),
        lambda: ssh_mux.OpenLocalFwd(1, "127.0.0.1", 0, "host", 80),
        lambda: ssh_mux.OpenLocalFwd(1, "127.0.0.1", 40000, "a\0b", 80),
        lambda: ssh_mux.OpenLocalFwd(1, "127.0.0.1", 40000, "host", 65536),
        lambda: ssh_mux.NewSession(1, ""),
        lambda: ssh_mux.NewSession(1, "a\0b"),
        lambda: ssh_mux.NewSession(1, "a" * (ssh_mux.MAX_COMMAND + 1)),
        lambda: ssh_mux.NewSession(2**32, "true"),
        lambda: ssh_mux.Hello("4"),  # type: ignore[arg-type]
    ],
)
def test_bad_requests_are_ours(make: object) -> None:
    with pytest.raises(LocalProtocolError):
        make()  # type: ignore[operator]


@given(st.lists(ANSWERS, max_size=8), st.integers(1, 64))
def test_answers_in_any_pieces(answers: list, piece: int) -> None:
    data = b"".join(wire(answer) for answer in answers)
    decoder = ssh_mux.MuxDecoder()
    got = []
    for start in range(0, len(data), piece):
        got += decoder.feed(data[start : start + piece])
    assert got == answers
    assert decoder.pending == 0


def test_hello_extensions_are_skipped() -> None:
    body = u32(4) + string(b"name") + string(b"value")
    assert ssh_mux.MuxDecoder().feed(packet(1, body)) == [ssh_mux.Hello(4)]


@pytest.mark.parametrize(
    "data",
    [
        u32(ssh_mux.MAX_PACKET + 1),  # too long, refused before it is read
        u32(2) + b"\0\0",  # shorter than a type
        packet(0x10000008, u32(1)),  # a request, not an answer
        packet(0x80000004, u32(1)),  # an exit message without its status
        packet(0x80000006, u32(1)),  # SessionOpened without its session id
        packet(0x80000006, u32(1) + u32(2) + b"x"),  # and with a byte too many
        packet(0x80000003, u32(1) + u32(10) + b"short"),  # reason past the packet
        packet(1, u32(4) + string(b"name")),  # extension without its value
    ],
)
def test_bad_answers_are_the_peers(data: bytes) -> None:
    decoder = ssh_mux.MuxDecoder()
    with pytest.raises(RemoteProtocolError):
        decoder.feed(data)
    with pytest.raises(RemoteProtocolError):  # and it stays broken
        decoder.feed(wire(ssh_mux.Ok(1)))


@given(st.binary(max_size=600), st.integers(1, 50))
def test_any_bytes_give_answers_or_a_remote_error(data: bytes, piece: int) -> None:
    decoder = ssh_mux.MuxDecoder()
    try:
        for start in range(0, len(data), piece):
            for answer in decoder.feed(data[start : start + piece]):
                assert type(answer).TYPE in ssh_mux.PARSERS
    except RemoteProtocolError:
        return
    assert decoder.pending <= len(data)
    assert decoder.pending <= ssh_mux.MAX_PACKET + 4

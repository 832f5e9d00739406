"""sock_diag: the real kernel's answers about real sockets, and answers that do not parse."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from shuttle_firewalld.sockdiag import (
    INET_DIAG_SKV6ONLY,
    NLM_F_DUMP_INTR,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOCK_DIAG_BY_FAMILY,
    DiagSocket,
    SockDiagError,
    dump,
    parse,
)

SEQ = 7


def message(kind: int, body: bytes, seq: int = SEQ, flags: int = 0) -> bytes:
    """One netlink message, padded to 4 bytes."""
    data = struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body
    return data + b"\0" * (-len(data) % 4)


def diag_msg(family: int, address: str, port: int, uid: int, attributes: bytes = b"") -> bytes:
    """An inet_diag_msg as the kernel sends it, then its attributes."""
    packed = socket.inet_pton(family, address).ljust(16, b"\0")
    return (
        struct.pack("=BBBB", family, 10, 0, 0)
        + struct.pack("!HH", port, 0)
        + packed
        + b"\0" * 16  # destination
        + b"\0" * 12  # interface, cookie
        + struct.pack("=IIIII", 0, 0, 0, uid, 4242)
        + attributes
    )


def v6only(value: int, size: int = 1) -> bytes:
    attribute = struct.pack("=HH", 4 + size, INET_DIAG_SKV6ONLY) + bytes([value]) * size
    return attribute + b"\0" * (-len(attribute) % 4)


DONE = message(NLMSG_DONE, struct.pack("=i", 0))


def listener(address: str, v6only: int, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET6)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
    sock.bind((address, port))
    sock.listen()
    return sock


def test_a_real_dump_sees_each_kind_of_socket() -> None:
    uid = os.getuid()
    with listener("::", 1) as only6, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        port = only6.getsockname()[1]
        udp.bind(("127.0.0.1", port))
        assert dump(6, "tcp", port) == [DiagSocket(ipaddress.ip_address("::"), port, uid, True)]
        assert dump(4, "tcp", port) == []
        assert dump(4, "udp", port) == [
            DiagSocket(ipaddress.ip_address("127.0.0.1"), port, uid, v6only=False)
        ]
    with listener("::", 0) as dual:
        port = dual.getsockname()[1]
        assert dump(6, "tcp", port) == [DiagSocket(ipaddress.ip_address("::"), port, uid, False)]
    with listener("::1", 0) as loopback:  # the kernel makes a socket on ::1 IPv6-only itself
        port = loopback.getsockname()[1]
        assert dump(6, "tcp", port) == [DiagSocket(ipaddress.ip_address("::1"), port, uid, True)]


def test_parse_reads_sockets_and_the_end() -> None:
    data = (
        message(SOCK_DIAG_BY_FAMILY, diag_msg(socket.AF_INET6, "::", 80, 1000, v6only(1)))
        + message(SOCK_DIAG_BY_FAMILY, diag_msg(socket.AF_INET6, "::1", 81, 1001, v6only(0)))
        + DONE
    )
    assert parse(data, 6, SEQ) == (
        [
            DiagSocket(ipaddress.ip_address("::"), 80, 1000, v6only=True),
            DiagSocket(ipaddress.ip_address("::1"), 81, 1001, v6only=False),
        ],
        True,
    )
    ipv4 = message(SOCK_DIAG_BY_FAMILY, diag_msg(socket.AF_INET, "127.0.0.1", 82, 0))
    assert parse(ipv4, 4, SEQ) == (
        [DiagSocket(ipaddress.ip_address("127.0.0.1"), 82, 0, False)],
        False,
    )


GOOD = diag_msg(socket.AF_INET6, "::", 80, 1000, v6only(1))


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\0" * 15, "less than a header"),
        (message(SOCK_DIAG_BY_FAMILY, GOOD)[:-4], "a message of 96 bytes, with 92 left"),
        (struct.pack("=IHHII", 8, NLMSG_DONE, 0, SEQ, 0), "a message of 8 bytes"),
        (message(SOCK_DIAG_BY_FAMILY, GOOD, seq=8), "an answer to request 8, not 7"),
        (message(SOCK_DIAG_BY_FAMILY, GOOD, flags=NLM_F_DUMP_INTR), "changed during the dump"),
        (message(NLMSG_ERROR, struct.pack("=i", -1)), "errno 1"),
        (message(NLMSG_ERROR, b""), "errno 0"),
        (message(99, GOOD), "a message of type 99"),
        (message(SOCK_DIAG_BY_FAMILY, GOOD[:71]), "a socket message of 71 bytes"),
        (
            message(SOCK_DIAG_BY_FAMILY, diag_msg(socket.AF_INET, "127.0.0.1", 80, 0)),
            "a socket of family 2 in a dump of IPv6",
        ),
        (message(SOCK_DIAG_BY_FAMILY, GOOD[:72] + b"\x01\0"), "a truncated attribute"),
        (
            message(SOCK_DIAG_BY_FAMILY, GOOD[:72] + struct.pack("=HH", 9, 1)),
            "an attribute of 9 bytes, with 4 left",
        ),
        (
            message(SOCK_DIAG_BY_FAMILY, GOOD[:72] + struct.pack("=HH", 2, 1)),
            "an attribute of 2 bytes",
        ),
        (
            message(SOCK_DIAG_BY_FAMILY, GOOD[:72] + v6only(1, size=2)),
            "INET_DIAG_SKV6ONLY of 2 bytes",
        ),
    ],
)
def test_parse_refuses_what_is_malformed(data: bytes, error: str) -> None:
    with pytest.raises(SockDiagError, match=error):
        parse(data, 6, SEQ)


@given(st.binary(max_size=400), st.sampled_from([4, 6]))
def test_parse_of_any_bytes_is_sockets_or_sockdiagerror(data: bytes, version: int) -> None:
    try:
        sockets, _ = parse(data, version, SEQ)
    except SockDiagError:
        return
    assert all(isinstance(item, DiagSocket) for item in sockets)


@given(st.binary(max_size=80))
def test_parse_of_any_attributes_is_a_socket_or_sockdiagerror(attributes: bytes) -> None:
    data = message(SOCK_DIAG_BY_FAMILY, GOOD[:72] + attributes)
    try:
        sockets, done = parse(data, 6, SEQ)
    except SockDiagError:
        return
    assert (len(sockets), done) == (1, False)

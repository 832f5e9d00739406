"""The kernel's table of TCP listeners and UDP sockets, asked over NETLINK_SOCK_DIAG.

/proc/net/tcp6 cannot tell whether a socket on :: is IPV6_V6ONLY, and that decides whether
IPv4 connections land on it; sock_diag says so (INET_DIAG_SKV6ONLY, sent for every AF_INET6
socket), with the owner's uid and the address and port. One dump per family and protocol
(inet_diag_req_v2, linux/inet_diag.h), of firewalld's own network namespace, like /proc/net.

Firewalld runs this as root on what the kernel answers: the parsing is bounded (lengths
checked against what is left, a cap on messages, a timeout on each read), and anything
malformed raises SockDiagError, which the caller turns into a refusal: never "dual-stack".
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .targets import Address

NETLINK_SOCK_DIAG = 4  # linux/netlink.h; the socket module does not export it
SOCK_DIAG_BY_FAMILY = 20  # linux/sock_diag.h
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_DUMP_INTR = 0x10  # the table changed under the dump: its answer may be incomplete
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_SKV6ONLY = 11  # linux/inet_diag.h: u8, the socket's IPV6_V6ONLY
TCP_LISTEN = 10  # include/net/tcp_states.h
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
# TCP: listening sockets only. UDP: every state: a connected socket holds its port too.
STATES = {"tcp": 1 << TCP_LISTEN, "udp": 0xFFFFFFFF}
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}

_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
# struct inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid
# (zeros: a dump ignores it).
_REQUEST = struct.Struct("=BBBxI48x")
_MESSAGE = struct.Struct("=BBBB")  # struct inet_diag_msg: family, state, timer, retrans
_PORT = struct.Struct("!H")  # idiag_sport, network order, at offset 4
_SOURCE = slice(8, 24)  # idiag_src: 16 bytes; an IPv4 address is the first 4
_UID = struct.Struct("=I")  # idiag_uid, at offset 64
_UID_AT = 64
_MESSAGE_LEN = 72  # sizeof(struct inet_diag_msg)
_ATTRIBUTE = struct.Struct("=HH")  # struct rtattr: len, type
_ERRNO = struct.Struct("=i")

RECV_BUFFER = 1 << 16  # one read: the kernel fills at most about 32 KiB per dump step
MAX_MESSAGES = 1 << 20  # sockets in one dump: far more than a host has, yet a bound
TIMEOUT = 2.0  # seconds one read may take


class SockDiagError(Exception):
    """The kernel's answer could not be had, or did not parse."""


@dataclass(frozen=True)
class DiagSocket:
    """One socket as sock_diag describes it."""

    address: Address
    port: int
    uid: int
    v6only: bool  # IPV6_V6ONLY; always False for IPv4


def request(version: int, protocol: str, seq: int) -> bytes:
    """The dump request for the sockets of one IP version and protocol ("tcp", "udp")."""
    body = _REQUEST.pack(FAMILIES[version], PROTOCOLS[protocol], 0, STATES[protocol])
    flags = NLM_F_REQUEST | NLM_F_DUMP
    return _HEADER.pack(_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, flags, seq, 0) + body


def parse(data: bytes, version: int, seq: int) -> tuple[list[DiagSocket], bool]:
    """The sockets in one datagram of a dump's answer, and whether it was the last one.

    SockDiagError for anything that is not a well-formed answer to request seq: a length
    that runs past the data, a message of another family, an error, an interrupted dump.
    """
    found: list[DiagSocket] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _HEADER.size:
            raise SockDiagError(f"{len(data) - offset} bytes left, less than a header")
        length, kind, flags, their_seq, _ = _HEADER.unpack_from(data, offset)
        if not _HEADER.size <= length <= len(data) - offset:
            raise SockDiagError(f"a message of {length} bytes, with {len(data) - offset} left")
        if their_seq != seq:
            raise SockDiagError(f"an answer to request {their_seq}, not {seq}")
        if flags & NLM_F_DUMP_INTR:
            raise SockDiagError("the socket table changed during the dump")
        body = data[offset + _HEADER.size : offset + length]
        offset += _align(length)
        if kind == NLMSG_DONE:
            return found, True
        if kind == NLMSG_ERROR:
            code = _ERRNO.unpack_from(body)[0] if len(body) >= _ERRNO.size else 0
            raise SockDiagError(f"the kernel refused the dump: errno {-code}")
        if kind != SOCK_DIAG_BY_FAMILY:
            raise SockDiagError(f"a message of type {kind}")
        found.append(_socket(body, version))
    return found, False


def dump(version: int, protocol: str, port: int | None) -> list[DiagSocket]:
    """The sockets of one IP version and protocol on port, or on any port if None (TCP:
    listening ones) in this network namespace; SockDiagError if the kernel's answer cannot
    be had or read."""
    found: list[DiagSocket] = []
    messages = 0
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
            sock.settimeout(TIMEOUT)
            sock.send(request(version, protocol, 1))
            while True:
                data = sock.recv(RECV_BUFFER)
                sockets, done = parse(data, version, 1)
                messages += len(sockets)
                if messages > MAX_MESSAGES:
                    raise SockDiagError(f"more than {MAX_MESSAGES} sockets")
                found.extend(item for item in sockets if port is None or item.port == port)
                if done:
                    return found
    except OSError as exc:  # timeouts included
        raise SockDiagError(f"sock_diag: {exc}") from None


def _socket(body: bytes, version: int) -> DiagSocket:
    """One inet_diag_msg and its attributes."""
    if len(body) < _MESSAGE_LEN:
        raise SockDiagError(f"a socket message of {len(body)} bytes")
    family = _MESSAGE.unpack_from(body)[0]
    if family != FAMILIES[version]:
        raise SockDiagError(f"a socket of family {family} in a dump of IPv{version}")
    raw = body[_SOURCE] if version == 6 else body[_SOURCE][:4]
    port = _PORT.unpack_from(body, 4)[0]
    uid = _UID.unpack_from(body, _UID_AT)[0]
    v6only = False
    for kind, payload in _attributes(body[_MESSAGE_LEN:]):
        if kind == INET_DIAG_SKV6ONLY:
            if len(payload) != 1:
                raise SockDiagError(f"INET_DIAG_SKV6ONLY of {len(payload)} bytes")
            v6only = payload[0] != 0
    return DiagSocket(ipaddress.ip_address(raw), port, uid, v6only)


def _attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each rtattr; SockDiagError for one that runs past the data."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < _ATTRIBUTE.size:
            raise SockDiagError("a truncated attribute")
        length, kind = _ATTRIBUTE.unpack_from(data, offset)
        if not _ATTRIBUTE.size <= length <= len(data) - offset:
            raise SockDiagError(f"an attribute of {length} bytes, with {len(data) - offset} left")
        yield kind, data[offset + _ATTRIBUTE.size : offset + length]
        offset += _align(length)


def _align(length: int) -> int:
    """Netlink messages and attributes start on 4-byte boundaries."""
    return (length + 3) & ~3


__all__ = ["DiagSocket", "SockDiagError", "dump", "parse", "request"]

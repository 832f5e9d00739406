"""Who is at the other end of a loopback connection: the uid that owns the peer's socket,
asked of the kernel for that one socket (NETLINK_SOCK_DIAG, an exact inet_diag_sockid
lookup, not a dump), so that a proxy without a password serves only its own user: each
TCP client, and each datagram of a UDP association. TCP gives no SO_PEERCRED;
/proc/net/tcp would be a scan of every socket per connection. (firewalld's sockdiag.py
dumps listeners; this asks for one connected socket.)"""

import socket
import struct
from typing import Optional, Tuple

NETLINK_SOCK_DIAG = 4  # linux/netlink.h; the socket module does not export it
SOCK_DIAG_BY_FAMILY = 20  # linux/sock_diag.h
NLM_F_REQUEST = 0x1
ALL_STATES = 0xFFFFFFFF
NO_COOKIE = 0xFFFFFFFF  # INET_DIAG_NOCOOKIE: match by address and port alone
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
# struct inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid:
# sport, dport (network order), src[16], dst[16], interface, cookie[2].
_REQUEST = struct.Struct("=BBBxI")
_SOCKID = struct.Struct("!HH16s16s")
_TAIL = struct.Struct("=III")
_UID_AT = 64  # idiag_uid in struct inet_diag_msg
_MESSAGE_LEN = 72
TIMEOUT = 1.0


def _packed(family: int, address: str) -> bytes:
    return socket.inet_pton(family, address).ljust(16, b"\0")


def peer_uid(conn: socket.socket) -> Optional[int]:
    """The uid owning the local socket at conn's other end; None if the kernel has none
    (the peer is not on this host, or is gone) or cannot say."""
    ours = conn.getsockname()
    theirs = conn.getpeername()
    family = conn.family
    sockid = _SOCKID.pack(theirs[1], ours[1], _packed(family, theirs[0]), _packed(family, ours[0]))
    return _owner(family, socket.IPPROTO_TCP, sockid)


def datagram_owner(sock: socket.socket, source: Tuple[str, int]) -> Optional[int]:
    """The uid owning the local UDP socket that sent sock a datagram from source; None as
    for peer_uid. The kernel's UDP lookup takes the sender's address as the destination of
    the (reverse) lookup: udp_diag swaps them "for historical reasons"."""
    ours = sock.getsockname()
    family = sock.family
    sockid = _SOCKID.pack(ours[1], source[1], _packed(family, ours[0]), _packed(family, source[0]))
    return _owner(family, socket.IPPROTO_UDP, sockid)


def _owner(family: int, protocol: int, sockid: bytes) -> Optional[int]:
    body = _REQUEST.pack(family, protocol, 0, ALL_STATES) + sockid
    body += _TAIL.pack(0, NO_COOKIE, NO_COOKIE)
    message = _HEADER.pack(_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as diag:
            diag.settimeout(TIMEOUT)
            diag.send(message + body)
            data = diag.recv(8192)
    except OSError:
        return None
    if len(data) < _HEADER.size:
        return None
    length, kind = _HEADER.unpack_from(data)[:2]
    if kind != SOCK_DIAG_BY_FAMILY or length > len(data):
        return None  # NLMSG_ERROR: no such socket (ENOENT), or not allowed
    reply = data[_HEADER.size : length]
    if len(reply) < _MESSAGE_LEN:
        return None
    return int(struct.unpack_from("=I", reply, _UID_AT)[0])

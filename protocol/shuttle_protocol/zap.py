"""ZAP (RFC 27) replies for our zmq ipc sockets: libzmq asks about each new connection, and
the reply names the caller's uid, or refuses it.

Sans-IO: frames in, frames out; each program binds its own REP socket at ZAP_ENDPOINT. The
uid comes from the kernel (SO_PEERCRED on the unix socket), never from what the caller
sends: libzmq puts the peer's credentials at the end of the address it hands to ZAP.
"""

import re
from dataclasses import dataclass
from typing import Callable, List, Optional

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
# The metadata property that carries the caller's pid: libzmq makes each property of a ZAP
# reply a property of every frame received on that connection, as it does the User-Id.
PID_PROPERTY = "X-Pid"
# libzmq's stream_engine_base get_peer_address() appends ":uid:gid:pid" for unix sockets.
_PEER_ADDRESS = re.compile(rb"(?s).*:(\d{1,10}):(\d{1,10}):(\d{1,10})")


@dataclass(frozen=True)
class Peer:
    """The kernel's credentials of the process at the other end of a connection."""

    uid: int
    gid: int
    pid: int


def parse_peer_address(address: bytes) -> Peer:
    """The credentials at the end of a ZAP address such as b"localhost:1000:1000:4242"."""
    match = _PEER_ADDRESS.fullmatch(address)
    if match is None:
        raise ValueError(f"no peer credentials in address {address[:80]!r}")
    uid, gid, pid = (int(number) for number in match.groups())
    return Peer(uid, gid, pid)


def anyone(peer: Peer) -> Optional[str]:
    """Admit every peer (the socket file's mode and group decide who can connect)."""
    return None


def zap_reply(
    frames: List[bytes], domain: bytes, admit: Callable[[Peer], Optional[str]] = anyone
) -> List[bytes]:
    """The reply to one ZAP request: 200 with the uid as user id and the pid as the
    PID_PROPERTY metadata if admit(peer) says nothing against it, else 400 with admit's
    reason. Only our domain and the NULL mechanism."""
    # A REP socket must answer every request, so even a malformed one gets a reply.
    request_id = frames[1] if len(frames) > 1 else b""
    if len(frames) < 6 or frames[0] != b"1.0":
        return _reply(request_id, b"500", b"malformed ZAP request", b"")
    _version, _id, their_domain, address, _identity, mechanism = frames[:6]
    if their_domain != domain or mechanism != b"NULL":
        return _reply(request_id, b"400", b"unexpected domain or mechanism", b"")
    try:
        peer = parse_peer_address(address)
    except ValueError:
        return _reply(request_id, b"400", b"no peer credentials", b"")
    refusal = admit(peer)
    if refusal is not None:
        return _reply(request_id, b"400", refusal.encode("utf-8", "replace")[:200], b"")
    pid = _property(PID_PROPERTY, str(peer.pid).encode("ascii"))
    return _reply(request_id, b"200", b"OK", str(peer.uid).encode("ascii"), pid)


def _property(name: str, value: bytes) -> bytes:
    """One metadata property as ZMTP encodes it: name length, name, value length, value."""
    encoded = name.encode("ascii")
    return bytes([len(encoded)]) + encoded + len(value).to_bytes(4, "big") + value


def _reply(
    request_id: bytes, status: bytes, text: bytes, user_id: bytes, metadata: bytes = b""
) -> List[bytes]:
    return [b"1.0", request_id, status, text, user_id, metadata]

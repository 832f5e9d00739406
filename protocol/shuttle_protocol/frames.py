"""Codec for zeromq frames: one msgpack value per frame, [request id, tag, field, ...].

Used between client and firewalld and on the control sockets. Answers echo the request's id.
"""

from typing import Any, List, Tuple

import msgpack

from .errors import LocalProtocolError, RemoteProtocolError
from .schema import FRAME_TAGS, Message, from_wire, to_wire
from .stream import new_unpacker, unpack_errors

# Big enough for a session with tens of thousands of subnets; a root daemon reads these.
MAX_FRAME = 4 * 1024 * 1024
MAX_ITEMS = 100_000
MAX_REQUEST_ID = 2**63 - 1


def encode_frame(request_id: int, msg: Message) -> bytes:
    """The bytes of one request or answer."""
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        raise LocalProtocolError(f"bad request id {request_id!r:.40}")
    if not isinstance(msg, Message):
        raise LocalProtocolError(f"not a message: {msg!r:.80}")
    data: bytes = msgpack.packb((request_id, *to_wire(msg)), use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise LocalProtocolError(f"{type(msg).__name__} is {len(data)} bytes, over {MAX_FRAME}")
    return data


def decode_frame(data: bytes) -> Tuple[int, Message]:
    """(request id, message) from one frame; anything malformed is the peer's error."""
    if len(data) > MAX_FRAME:
        raise RemoteProtocolError(f"frame of {len(data)} bytes is over {MAX_FRAME}")
    unpacker = new_unpacker(MAX_FRAME, MAX_ITEMS, MAX_FRAME)
    try:
        unpacker.feed(data)
        values = list(unpacker)
    except unpack_errors() as exc:
        raise RemoteProtocolError(f"malformed frame: {type(exc).__name__}: {exc}") from None
    return frame_message(values)


def frame_message(values: List[Any]) -> Tuple[int, Message]:
    """(request id, message) from the values a frame decoded to (one, if it is well formed):
    decode_frame's second half, for a caller that unpacks in its own way."""
    if len(values) != 1:
        raise RemoteProtocolError(f"a frame holds one value, this one {len(values)}")
    value = values[0]
    if type(value) is not tuple or len(value) < 2:
        raise RemoteProtocolError("a frame is [request id, tag, field, ...]")
    request_id = value[0]
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        raise RemoteProtocolError(f"bad request id {request_id!r:.40}")
    return request_id, from_wire(value[1:], FRAME_TAGS)

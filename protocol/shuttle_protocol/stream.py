"""Sans-IO codec for the ssh pipe: a byte stream of consecutive msgpack values.

feed(bytes) returns the complete messages; encode(message) returns bytes. Every limit is
enforced while decoding, so a hostile peer can neither make the buffer grow without bound
nor make decoding hang. After an error the codec refuses further input.

Data, the bulk of the stream, is the one exception to "one msgpack value per message": it
is the array [6, channel, size] followed by size raw bytes. Its payload then bypasses
msgpack, which would copy it two or three times; the agent often runs msgpack's
pure-Python fallback, where those copies took a third of its time in a bulk transfer.
"""

import struct
from typing import Any, List, Optional, Tuple, Union

import msgpack

from .checks import check_int
from .errors import LocalProtocolError, RemoteProtocolError
from .schema import STREAM_TAGS, Message, from_wire, to_wire
from .stream_messages import MAX_CHANNEL, MAX_DATA, Data

# The largest message is one Data with a full payload, plus a few bytes of framing.
MAX_MESSAGE = MAX_DATA + 64
# Input is fed to the unpacker in slices this big, and consumed after each slice, so the
# unpacker never holds more than one partial message plus one slice.
HEADER_SLICE = 512
MAX_BUFFER = MAX_MESSAGE + HEADER_SLICE


def new_unpacker(max_message: int, max_items: int, max_buffer: int) -> Any:
    """An Unpacker that refuses anything our schema cannot contain."""
    return msgpack.Unpacker(
        use_list=False,
        raw=False,
        strict_map_key=True,
        max_buffer_size=max_buffer,
        max_bin_len=max_message,
        max_str_len=max_message,
        max_array_len=max_items,
        max_map_len=0,
        max_ext_len=0,
    )


def unpack_errors() -> tuple:  # type: ignore[type-arg]
    """What msgpack (C or pure Python) raises on malformed or over-limit input."""
    return (ValueError, TypeError, RecursionError, msgpack.UnpackException)


def encode(msg: Message) -> bytes:
    """The bytes of one message on the stream."""
    if not isinstance(msg, Message):
        raise LocalProtocolError(f"not a message: {msg!r:.80}")
    if isinstance(msg, Data):
        return encode_data_header(msg.channel, len(msg.payload)) + msg.payload
    return msgpack.packb(to_wire(msg), use_bin_type=True)  # type: ignore[no-any-return]


def encode_data_header(channel: int, size: int) -> bytes:
    """The msgpack array [Data.TAG, channel, size] that goes before a Data payload.

    The data path's fast lane: header + payload is encode(Data(channel, payload)), without
    building the message or copying the payload into a msgpack buffer.
    """
    check_int(channel, "channel", 1, MAX_CHANNEL)
    check_int(size, "payload size", 0, MAX_DATA)
    return _DATA_HEAD + _uint(channel) + _uint(size)


def _uint(n: int) -> bytes:
    """msgpack's shortest encoding of a non-negative int: fixint, uint8/16/32/64."""
    if n < 0x80:
        return bytes((n,))
    if n < 0x100:
        return b"\xcc" + bytes((n,))
    if n < 0x10000:
        return b"\xcd" + struct.pack(">H", n)
    if n < 0x100000000:
        return b"\xce" + struct.pack(">I", n)
    return b"\xcf" + struct.pack(">Q", n)


_DATA_HEAD = bytes((0x93, Data.TAG))  # fixarray of 3: the tag, the channel, the size


class StreamDecoder:
    """Bytes in, messages out. Not thread-safe; one per direction of one pipe."""

    def __init__(self, max_message: int = MAX_MESSAGE, max_items: int = 256) -> None:
        self._unpacker = new_unpacker(max_message, max_items, max_message + HEADER_SLICE)
        self._errors = unpack_errors()
        self._failed: Optional[RemoteProtocolError] = None
        self._max_message = max_message
        self._fed = 0  # stream offset of the end of the input so far
        self._done = 0  # stream offset of the end of the last complete message (or header)
        self._bypassed = 0  # payload bytes taken from the input, never fed to the unpacker
        self._payload_channel = 0  # the Data whose payload is coming in
        self._payload_left = 0  # how much of it is still to come
        self._parts: List[Union[bytes, memoryview]] = []  # what came of it so far

    def feed(self, data: bytes) -> List[Message]:
        """Add received bytes; return every message they complete (possibly none)."""
        if self._failed is not None:
            raise self._failed
        messages: List[Message] = []
        view = memoryview(data)
        pos = 0
        try:
            while pos < len(view):
                if self._payload_left:
                    pos = self._take_payload(view, pos, messages)
                    continue
                # Small slices: the bytes after a Data header should mostly skip the unpacker.
                chunk = view[pos : pos + HEADER_SLICE]
                pos += len(chunk)
                self._unpacker.feed(chunk)
                self._fed += len(chunk)
                self._unpack(messages)
                # The C unpacker keeps the items of an unfinished array outside its buffer,
                # so max_buffer_size alone does not bound a message that never ends.
                if not self._payload_left and self._fed - self._done > self._max_message:
                    raise RemoteProtocolError(f"a message longer than {self._max_message} bytes")
        except RemoteProtocolError as exc:
            self._failed = exc
            raise
        except self._errors as exc:
            self._failed = RemoteProtocolError(f"malformed stream: {type(exc).__name__}: {exc}")
            raise self._failed from None
        return messages

    def _unpack(self, messages: List[Message]) -> None:
        for value in self._unpacker:
            self._done = self._unpacker.tell() + self._bypassed
            if type(value) is not tuple or not value or value[0] != Data.TAG:
                messages.append(from_wire(value, STREAM_TAGS))
                continue
            self._payload_channel, self._payload_left = _data_header(value)
            if self._payload_left > self._max_message:
                raise RemoteProtocolError(f"a message longer than {self._max_message} bytes")
            buffered = min(self._fed - self._done, self._payload_left)
            if buffered:  # the start of the payload came in the same slice
                self._parts.append(self._unpacker.read_bytes(buffered))
                self._done += buffered
                self._payload_left -= buffered
            if self._payload_left:
                return  # the rest comes straight from the input, not through the unpacker
            messages.append(self._payload_done())

    def _take_payload(self, view: memoryview, pos: int, messages: List[Message]) -> int:
        take = min(self._payload_left, len(view) - pos)
        self._parts.append(view[pos : pos + take])
        self._payload_left -= take
        self._bypassed += take
        self._fed += take
        self._done += take
        if not self._payload_left:
            messages.append(self._payload_done())
        return pos + take

    def _payload_done(self) -> Data:
        parts, self._parts = self._parts, []
        payload = parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)
        return Data(self._payload_channel, payload)


def _data_header(value: Tuple[Any, ...]) -> Tuple[int, int]:
    """(channel, size) from a decoded Data header; the peer's error if it is not one."""
    if len(value) != 3:
        raise RemoteProtocolError(f"Data takes a channel and a size, got {len(value) - 1} fields")
    _, channel, size = value
    try:
        check_int(channel, "channel", 1, MAX_CHANNEL)
        check_int(size, "payload size", 0, MAX_DATA)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"invalid Data: {exc}") from None
    return channel, size

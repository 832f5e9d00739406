"""Sans-IO codec for the ssh pipe: a byte stream of consecutive msgpack values.

feed(bytes) returns the complete messages; encode(message) returns bytes. Every limit is
enforced while decoding, so a hostile peer can neither make the buffer grow without bound
nor make decoding hang. After an error the codec refuses further input.
"""

import struct
from typing import Any, List, Optional

import msgpack

from .errors import LocalProtocolError, RemoteProtocolError
from .schema import STREAM_TAGS, Message, from_wire, to_wire
from .stream_messages import MAX_CHANNEL, MAX_DATA, Data

# The largest message is one Data with a full payload, plus a few bytes of framing.
MAX_MESSAGE = MAX_DATA + 64
# Input is fed to the unpacker in slices this big, and consumed after each slice, so the
# unpacker never holds more than one partial message plus one slice.
FEED_SLICE = 64 * 1024
MAX_BUFFER = MAX_MESSAGE + FEED_SLICE


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
    return msgpack.packb(to_wire(msg), use_bin_type=True)  # type: ignore[no-any-return]


def encode_data_header(channel: int, size: int) -> bytes:
    """The bytes of Data(channel, payload) up to the payload, for a payload of size bytes.

    The data path's fast lane: header + payload is exactly encode(Data(channel, payload)),
    without building the message or copying the payload into a msgpack buffer.
    """
    if type(channel) is not int or not 0 < channel < MAX_CHANNEL:
        raise LocalProtocolError(f"channel {channel!r:.40} out of range")
    if type(size) is not int or not 0 <= size <= MAX_DATA:
        raise LocalProtocolError(f"payload size {size!r:.40} out of range")
    if channel < 0x80:  # msgpack: positive fixint, then uint8/16/32/64
        head = _DATA_HEAD + bytes((channel,))
    elif channel < 0x100:
        head = _DATA_HEAD + b"\xcc" + bytes((channel,))
    elif channel < 0x10000:
        head = _DATA_HEAD + b"\xcd" + struct.pack(">H", channel)
    elif channel < 0x100000000:
        head = _DATA_HEAD + b"\xce" + struct.pack(">I", channel)
    else:
        head = _DATA_HEAD + b"\xcf" + struct.pack(">Q", channel)
    if size < 0x100:  # msgpack: bin8, bin16, bin32
        return head + b"\xc4" + bytes((size,))
    if size < 0x10000:
        return head + b"\xc5" + struct.pack(">H", size)
    return head + b"\xc6" + struct.pack(">I", size)


_DATA_HEAD = bytes((0x93, Data.TAG))  # fixarray of 3: the tag, the channel, the payload


class StreamDecoder:
    """Bytes in, messages out. Not thread-safe; one per direction of one pipe."""

    def __init__(self, max_message: int = MAX_MESSAGE, max_items: int = 256) -> None:
        self._unpacker = new_unpacker(max_message, max_items, max_message + FEED_SLICE)
        self._errors = unpack_errors()
        self._failed: Optional[RemoteProtocolError] = None
        self._max_message = max_message
        self._fed = 0  # stream offset of the end of the input so far
        self._done = 0  # stream offset of the end of the last complete message

    def feed(self, data: bytes) -> List[Message]:
        """Add received bytes; return every message they complete (possibly none)."""
        if self._failed is not None:
            raise self._failed
        messages: List[Message] = []
        view = memoryview(data)
        try:
            for start in range(0, len(view), FEED_SLICE):
                chunk = view[start : start + FEED_SLICE]
                self._unpacker.feed(chunk)
                self._fed += len(chunk)
                for value in self._unpacker:
                    self._done = self._unpacker.tell()
                    messages.append(from_wire(value, STREAM_TAGS))
                # The C unpacker keeps the items of an unfinished array outside its buffer,
                # so max_buffer_size alone does not bound a message that never ends.
                if self._fed - self._done > self._max_message:
                    raise RemoteProtocolError(f"a message longer than {self._max_message} bytes")
        except RemoteProtocolError as exc:
            self._failed = exc
            raise
        except self._errors as exc:
            self._failed = RemoteProtocolError(f"malformed stream: {type(exc).__name__}: {exc}")
            raise self._failed from None
        return messages

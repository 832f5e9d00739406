"""A coverage-guided (atheris, libFuzzer) harness for the ssh-pipe decoder and the frame
decoder: bytes in any chunks, on either msgpack implementation, give messages or a
RemoteProtocolError, after which the decoder refuses everything; nothing else may escape.

Run by test_atheris.py for a bounded number of inputs; by hand for longer:
    .venv/bin/python tests/protocol/fuzz_stream.py -runs=1000000 -artifact_prefix=/tmp/
"""

import sys
from typing import List
from unittest import mock

import atheris  # type: ignore[import-untyped]  # (its stubs are types-atheris)

with atheris.instrument_imports():
    import msgpack
    import msgpack.fallback
    from shuttle_protocol.errors import RemoteProtocolError
    from shuttle_protocol.frames import decode_frame
    from shuttle_protocol.schema import Message
    from shuttle_protocol.stream import StreamDecoder, encode
    from shuttle_protocol.stream_messages import Ping

IMPLEMENTATIONS = (msgpack.Unpacker, msgpack.fallback.Unpacker)


def check_stream(data: bytes, cuts: List[int], fallback: bool) -> None:
    with mock.patch.object(msgpack, "Unpacker", IMPLEMENTATIONS[fallback]):
        decoder = StreamDecoder()
    points = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    try:
        for start, end in zip(points, points[1:]):
            for msg in decoder.feed(data[start:end]):
                if not isinstance(msg, Message):
                    raise AssertionError(f"not a message: {msg!r:.80}")
    except RemoteProtocolError:
        try:
            decoder.feed(encode(Ping(1)))
        except RemoteProtocolError:
            return
        raise AssertionError("the decoder took input after an error") from None


def check_frame(data: bytes) -> None:
    try:
        request_id, msg = decode_frame(data)
    except RemoteProtocolError:
        return
    if type(request_id) is not int or not isinstance(msg, Message):
        raise AssertionError(f"decode_frame gave {request_id!r:.40}, {msg!r:.80}")


def one_input(raw: bytes) -> None:
    provider = atheris.FuzzedDataProvider(raw)
    fallback = provider.ConsumeBool()
    cuts = [provider.ConsumeIntInRange(0, 1 << 16) for _ in range(provider.ConsumeIntInRange(0, 4))]
    data = provider.ConsumeBytes(provider.remaining_bytes())
    check_stream(data, cuts, fallback)
    check_frame(data)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

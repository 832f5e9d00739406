"""Every field of every message refuses bad values: LocalProtocolError when we build the
message, RemoteProtocolError when the same value arrives on either carrier."""

import math
from typing import Any, List, Tuple, Type

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shuttle_protocol.errors import LocalProtocolError, RemoteProtocolError
from shuttle_protocol.frames import decode_frame
from shuttle_protocol.schema import REGISTRY, STREAM_TAGS, Message, from_wire
from shuttle_protocol.stream_messages import Data

from .strategies import (
    EXAMPLES,
    IMPLEMENTATIONS,
    STRATEGIES,
    bad_cases,
    case_id,
    make_decoder,
    pack,
    replace_field,
    survives_wire,
    wire_fields,
    with_impl,
)

ALL_TAGS = range(256)


def stream_bytes(tag: int, fields: Tuple[Any, ...]) -> bytes:
    """The fields as they go on the stream: msgpack [tag, *fields], except for Data, whose
    payload follows its header [tag, channel, size] raw."""
    if tag == Data.TAG and len(fields) == 2 and isinstance(fields[1], bytes):
        return pack((tag, fields[0], len(fields[1]))) + fields[1]
    return pack((tag, *fields))


def receive(impl: str, tag: int, fields: Tuple[Any, ...]) -> List[Message]:
    """Decode the fields as the carrier of that tag does: the stream or a zmq frame."""
    if tag in STREAM_TAGS:
        return make_decoder(impl).feed(stream_bytes(tag, fields))
    return [with_impl(impl, decode_frame, pack((5, tag, *fields)))[1]]


def on_the_wire(case: Tuple[Any, str, Any]) -> bool:
    """Whether the bad value can be sent at all: msgpack keeps it, and it is not a Data
    payload that is not bytes (a payload is raw bytes on the wire; test_stream.py tests
    bad Data headers)."""
    cls, field, value = case
    return survives_wire(value) and not (cls is Data and field == "payload")


CLASSES: List[Type[Message]] = sorted(REGISTRY.values(), key=lambda cls: cls.TAG)
CASES = bad_cases()
WIRE_CASES = [case for case in CASES if on_the_wire(case)]


def test_the_bad_value_table_reaches_the_wire() -> None:
    # Guard against survives_wire() silently dropping everything.
    assert len(WIRE_CASES) > len(CASES) // 2


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_building_with_a_bad_value_is_a_local_error(case: Tuple[Any, str, Any]) -> None:
    cls, field, value = case
    with pytest.raises(LocalProtocolError):
        cls(*replace_field(cls, field, value))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", WIRE_CASES, ids=case_id)
def test_receiving_a_bad_value_is_a_remote_error(case: Tuple[Any, str, Any], impl: str) -> None:
    cls, field, value = case
    fields = replace_field(cls, field, value)
    with pytest.raises(RemoteProtocolError, match=f"invalid {cls.__name__}|malformed"):
        receive(impl, cls.TAG, fields)


@pytest.mark.parametrize("cls", CLASSES, ids=repr)
def test_the_valid_example_is_received_unchanged(cls: Type[Message]) -> None:
    example = EXAMPLES[cls]
    assert receive("c", cls.TAG, wire_fields(example)) == [example]


# Anything msgpack can carry, to put in any field.
wire_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=70),
        st.binary(max_size=70),
    ),
    lambda inner: st.lists(inner, max_size=4).map(tuple),
    max_leaves=8,
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@given(st.data())
@settings(max_examples=400, deadline=None)
def test_any_value_in_any_field_is_valid_or_refused_alike_on_both_ends(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from(CLASSES))
    if not cls.FIELDS:
        return
    fields = list(wire_fields(data.draw(STRATEGIES[cls])))
    index = data.draw(st.integers(0, len(fields) - 1))
    fields[index] = data.draw(wire_values)
    if cls is Data and index == 1 and not isinstance(fields[1], bytes):
        return  # no wire form: the payload is raw bytes (test_stream.py: bad Data headers)
    raw = pack((cls.TAG, *fields))
    decoded_fields = msgpack.unpackb(raw, use_list=False, raw=False)[1:]
    try:
        local = cls(*decoded_fields)
    except LocalProtocolError:
        local = None
    try:
        remote = receive("c", cls.TAG, decoded_fields)
    except RemoteProtocolError:
        remote = None
    if local is None:
        assert remote is None
        with pytest.raises(RemoteProtocolError):
            from_wire((cls.TAG, *decoded_fields), ALL_TAGS)
    else:
        assert remote == [local]
        assert all(_same(getattr(local, n), v) for n, v in zip(cls.FIELDS, decoded_fields))

"""The registry, the shape of every message class, and from_wire/to_wire."""

import dataclasses
from typing import Any, Type

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shuttle_protocol import control_messages as cm
from shuttle_protocol import firewall_messages as fw
from shuttle_protocol import stream_messages as sm
from shuttle_protocol.errors import LocalProtocolError, RemoteProtocolError
from shuttle_protocol.frames import decode_frame, encode_frame
from shuttle_protocol.schema import REGISTRY, Message, from_wire, message, to_wire
from shuttle_protocol.stream import StreamDecoder, encode

from .strategies import BAD_VALUES, EXAMPLES, STRATEGIES, messages, wire_fields

ALL_TAGS = range(256)

CLASSES = sorted(REGISTRY.values(), key=lambda cls: cls.TAG)


def test_every_registered_class_has_a_strategy_an_example_and_bad_values() -> None:
    registered = set(REGISTRY.values())
    assert set(STRATEGIES) == registered
    assert set(EXAMPLES) == registered
    assert set(BAD_VALUES) == registered
    for cls, fields in BAD_VALUES.items():
        assert set(fields) == set(cls.FIELDS), cls.__name__
        assert all(fields.values()), cls.__name__


def test_registry_maps_each_tag_to_its_class() -> None:
    assert REGISTRY
    for tag, cls in REGISTRY.items():
        assert cls.TAG == tag
        assert issubclass(cls, Message)


@pytest.mark.parametrize("module, low, high", [(sm, 1, 63), (fw, 64, 127), (cm, 128, 191)])
def test_tags_lie_in_their_carriers_range(module: Any, low: int, high: int) -> None:
    classes = [cls for cls in CLASSES if cls.__module__ == module.__name__]
    assert classes
    for cls in classes:
        assert low <= cls.TAG <= high, cls.__name__


def test_all_registered_classes_come_from_the_message_modules() -> None:
    assert {cls.__module__ for cls in CLASSES} == {sm.__name__, fw.__name__, cm.__name__}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_slots_are_the_dataclass_fields_in_order(cls: Type[Message]) -> None:
    names = tuple(field.name for field in dataclasses.fields(cls))  # type: ignore[arg-type]
    # A message may take its fields from a base (the route changes share theirs).
    slots = tuple(
        name for klass in reversed(cls.__mro__) for name in vars(klass).get("__slots__", ())
    )
    assert slots == names
    assert cls.FIELDS == names
    assert not hasattr(EXAMPLES[cls], "__dict__")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_messages_are_frozen(cls: Type[Message]) -> None:
    example = EXAMPLES[cls]
    assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    for name in cls.FIELDS:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(example, name, getattr(example, name))
    with pytest.raises((dataclasses.FrozenInstanceError, AttributeError)):
        example.extra = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_messages_are_hashable_and_compare_by_value(cls: Type[Message]) -> None:
    example = EXAMPLES[cls]
    again = cls(*wire_fields(example))
    assert again == example
    assert hash(again) == hash(example)


def test_registering_a_tag_twice_is_refused() -> None:
    before = dict(REGISTRY)

    @dataclasses.dataclass(frozen=True)
    class Duplicate(Message):
        __slots__ = ()

    with pytest.raises(LocalProtocolError, match="registered twice"):
        message(sm.Hello.TAG)(Duplicate)
    assert before == REGISTRY


@given(messages)
@settings(max_examples=200, deadline=None)
def test_to_wire_and_from_wire_round_trip(msg: Message) -> None:
    value = to_wire(msg)
    assert value == (msg.TAG, *wire_fields(msg))
    back = from_wire(value, ALL_TAGS)
    assert type(back) is type(msg)
    assert back == msg


@pytest.mark.parametrize(
    "value",
    [None, 1, "x", b"x", [1, 1], {1: 1}, (), 1.0, True],
    ids=repr,
)
def test_from_wire_refuses_what_is_not_a_message_array(value: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        from_wire(value, ALL_TAGS)


UNUSED_TAGS = [t for t in [0, 13, 63, 70, 126, 128, 191, 2**64 - 1, -1] if t not in REGISTRY]


@pytest.mark.parametrize("tag", [*UNUSED_TAGS, True, 1.0, "1", b"\x01", None, (1,)], ids=repr)
def test_from_wire_refuses_unknown_tags(tag: Any) -> None:
    with pytest.raises(RemoteProtocolError, match="unknown message tag"):
        from_wire((tag, 1), ALL_TAGS)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_from_wire_refuses_wrong_arity(cls: Type[Message]) -> None:
    fields = wire_fields(EXAMPLES[cls])
    with pytest.raises(RemoteProtocolError, match="fields"):
        from_wire((cls.TAG, *fields, 1), ALL_TAGS)
    if fields:
        with pytest.raises(RemoteProtocolError, match="fields"):
            from_wire((cls.TAG, *fields[:-1]), ALL_TAGS)


@given(st.sampled_from(CLASSES), st.integers(0, 8))
def test_from_wire_refuses_every_other_field_count(cls: Type[Message], count: int) -> None:
    if count == len(cls.FIELDS):
        return
    with pytest.raises(RemoteProtocolError):
        from_wire((cls.TAG, *([1] * count)), ALL_TAGS)


def test_from_wire_blames_the_peer_for_invalid_fields() -> None:
    with pytest.raises(RemoteProtocolError, match="invalid Open") as info:
        from_wire((sm.Open.TAG, 1, "host", 0), ALL_TAGS)
    assert not isinstance(info.value, LocalProtocolError)
    assert info.value.__suppress_context__  # the local check's traceback is not the peer's


def test_each_carrier_refuses_the_other_carriers_messages() -> None:
    request = fw.HeartbeatRequest("a" * 32)
    with pytest.raises(RemoteProtocolError, match="unknown message tag"):
        StreamDecoder().feed(encode(request))
    frame = encode_frame(1, sm.Ping(1))
    with pytest.raises(RemoteProtocolError, match="unknown message tag"):
        decode_frame(frame)
    assert decode_frame(encode_frame(1, request)) == (1, request)

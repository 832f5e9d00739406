"""The registry of message tags, and conversion between messages and wire values.

Every message is a frozen dataclass registered here under one tag; on the wire it is the
msgpack array [tag, field, ...]. Tags 1-63 travel on the ssh pipe, 64-127 between client and
firewalld, 128-191 on the control sockets.
"""

import dataclasses
from typing import Any, Callable, ClassVar, Dict, Tuple, Type, TypeVar

from .errors import LocalProtocolError, RemoteProtocolError


class Message:
    """Base of every message. Subclasses are frozen dataclasses that validate themselves."""

    __slots__ = ()
    TAG: ClassVar[int]
    FIELDS: ClassVar[Tuple[str, ...]]


M = TypeVar("M", bound=Message)

REGISTRY: Dict[int, Type[Message]] = {}


def message(tag: int) -> Callable[[Type[M]], Type[M]]:
    """Class decorator: register a message dataclass under its wire tag."""

    def register(cls: Type[M]) -> Type[M]:
        if tag in REGISTRY:
            raise LocalProtocolError(f"tag {tag} registered twice ({REGISTRY[tag].__name__})")
        cls.TAG = tag
        cls.FIELDS = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        REGISTRY[tag] = cls
        return cls

    return register


def to_wire(msg: Message) -> Tuple[Any, ...]:
    """The msgpack-ready value of a message: (tag, field, ...)."""
    return (msg.TAG, *(getattr(msg, name) for name in msg.FIELDS))


STREAM_TAGS = range(1, 64)
FRAME_TAGS = range(64, 192)


def from_wire(value: Any, tags: range) -> Message:
    """Build and validate a message from a decoded wire value; bad input is the peer's fault.

    tags is the carrier's range: a firewall request has no business on the ssh pipe.
    """
    if type(value) is not tuple or not value:
        raise RemoteProtocolError(f"expected a message array, got {type(value).__name__}")
    tag = value[0]
    cls = REGISTRY.get(tag) if type(tag) is int and tag in tags else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message tag {tag!r:.40}")
    if len(value) - 1 != len(cls.FIELDS):
        raise RemoteProtocolError(
            f"{cls.__name__} takes {len(cls.FIELDS)} fields, got {len(value) - 1}"
        )
    try:
        return cls(*value[1:])
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"invalid {cls.__name__}: {exc}") from None

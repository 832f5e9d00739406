"""Requests and answers over zmq frames, sans-IO: which answer goes with which request, a
caller that numbers requests and matches their answers, and the one rule for refusing a
frame: under the request's id when the frame starts with one, else 0 (so also a request
sent in several frames, where no one frame is the request).

Each message set declares its Pairs beside its messages (firewall_messages.PAIRS,
control_messages.PAIRS). The sockets, timeouts and loops stay in thin drivers: the caller
turns bytes into answers, the server side turns a refusal into bytes, and neither waits.
"""

import itertools
from typing import Generic, Iterator, Mapping, Optional, Set, Type, TypeVar, Union

from .errors import LocalProtocolError, RemoteProtocolError
from .frames import MAX_FRAME, MAX_ITEMS, MAX_REQUEST_ID, decode_frame, encode_frame
from .schema import Message
from .stream import new_unpacker, unpack_errors

A = TypeVar("A", bound=Message)
MAX_ERROR_TEXT = 2000  # the error answers' own limit (ErrorAnswer, ControlError)


class AnswerError(Exception):
    """The answer is not the one asked for. refused: the peer's error answer, and str() is
    its text; otherwise str() says what came instead (a malformed frame, another type)."""

    def __init__(self, text: str, refused: bool) -> None:
        super().__init__(text)
        self.refused = refused

    def from_peer(self, peer: str, said: str = "") -> str:
        """The text for the user, the peer named: "<peer><said>: <text>" for a refusal,
        "<peer> <what came>" otherwise."""
        return f"{peer}{said}: {self}" if self.refused else f"{peer} {self}"


class Pairs:
    """One message set's table: each request type with the one answer type it gets, and
    the error answer (a message with one field, `text`) that any request may get instead."""

    __slots__ = ("answers", "error")

    def __init__(
        self, answers: Mapping[Type[Message], Type[Message]], error: Type[Message]
    ) -> None:
        if error.FIELDS != ("text",):
            raise LocalProtocolError(f"{error.__name__} is not an error answer: no text field")
        if error in answers or error in answers.values():
            raise LocalProtocolError(f"{error.__name__} is the error answer, not a pair's")
        self.answers = dict(answers)
        self.error = error

    def answer_type(self, request: Message) -> Type[Message]:
        """The answer type that goes with this request; LocalProtocolError if it is none of
        this set's requests."""
        kind = self.answers.get(type(request))
        if kind is None:
            raise LocalProtocolError(f"{type(request).__name__} is not a request of this set")
        return kind

    def reply(self, request_id: int, request: Message, answer: Message) -> bytes:
        """The frame of the answer to a request; LocalProtocolError if the answer is not of
        the request's answer type (or too big for a frame)."""
        if type(answer) is not self.answer_type(request):
            raise LocalProtocolError(
                f"{type(answer).__name__} is not the answer to {type(request).__name__}"
            )
        return encode_frame(request_id, answer)

    def refuse(self, request_id: int, text: str) -> bytes:
        """The error answer frame, its text cut to what the error answer holds."""
        return encode_frame(request_id, self.error(text[:MAX_ERROR_TEXT]))  # type: ignore[call-arg]

    def refuse_frame(self, payload: Union[bytes, memoryview, None], text: str) -> bytes:
        """The error answer to a frame not served (malformed, too big, one too many): under
        the request's id if the payload starts with one, so that the caller can match it."""
        return self.refuse(0 if payload is None else request_id_of(payload), text)


def request_id_of(payload: Union[bytes, memoryview]) -> int:
    """The request id a frame starts with, read without decoding the rest: 0 when the frame
    does not even start as [request id, ...]."""
    unpacker = new_unpacker(MAX_FRAME, MAX_ITEMS, MAX_FRAME)
    try:
        unpacker.feed(payload)
        if unpacker.read_array_header() < 1:
            return 0
        request_id = unpacker.unpack()
    except unpack_errors():
        return 0
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        return 0
    return request_id


class Call(Generic[A]):
    """One request, sent once or more (each copy under a new id), and its answer: the answer
    to any copy counts; frames with other ids are the late answers of earlier calls."""

    __slots__ = ("_pairs", "_ids", "request", "kind", "sent")

    def __init__(self, pairs: Pairs, ids: Iterator[int], request: Message, kind: Type[A]) -> None:
        if pairs.answer_type(request) is not kind:
            raise LocalProtocolError(f"{type(request).__name__} is not answered by {kind.__name__}")
        self._pairs = pairs
        self._ids = ids
        self.request = request
        self.kind = kind
        self.sent: Set[int] = set()

    def frame(self) -> bytes:
        """The bytes of one more copy of the request, under a new id."""
        request_id = next(self._ids)
        data = encode_frame(request_id, self.request)
        self.sent.add(request_id)
        return data

    def receive(self, data: bytes) -> Optional[A]:
        """The answer, if this frame is the answer to one of our copies; None if it is a late
        answer to another call. AnswerError if it is malformed, an error answer, or of
        another type than the request's answer."""
        try:
            answer_id, answer = decode_frame(data)
        except RemoteProtocolError as exc:
            raise AnswerError(f"sent a malformed answer: {exc}", refused=False) from None
        if answer_id not in self.sent:
            return None
        if type(answer) is self._pairs.error:
            raise AnswerError(answer.text, refused=True)  # type: ignore[attr-defined]
        # Exactly the type: an answer that subclasses another (BypassSocketAnswer) answers
        # its own request only.
        if type(answer) is not self.kind:
            raise AnswerError(
                f"answered {type(self.request).__name__} with {type(answer).__name__}",
                refused=False,
            )
        return answer


class Caller:
    """The requesting side of one connection: numbers every request it sends from 1 on, so
    that no two calls share an id."""

    __slots__ = ("pairs", "_ids")

    def __init__(self, pairs: Pairs) -> None:
        self.pairs = pairs
        self._ids = itertools.count(1)

    def call(self, request: Message, kind: Type[A]) -> Call[A]:
        """A call of request, whose answer is of kind (the table's answer type for it:
        LocalProtocolError otherwise)."""
        return Call(self.pairs, self._ids, request, kind)

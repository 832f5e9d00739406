"""A small synchronous client of a running shuttle-client's control sockets, for scripts and
for `shuttle-client ctl`: one method per request, and an iterator over the events.

    with ControlClient() as ctl:
        print(ctl.status().state)
        ctl.add(["10.3.0.0/16"], excludes=["10.3.9.0/24"])

Plain zmq, no asyncio: a DEALER on the request socket, one request in flight at a time
(answers to requests that timed out are dropped by their id), and a SUB on the events socket.
Not thread-safe: one ControlClient per thread. docs/control.md describes the schema.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TypeVar, Union

import zmq
from shuttle_protocol.control_messages import (
    EVENTS,
    PAIRS,
    AddRoutesAnswer,
    AddRoutesRequest,
    ConnectionsAnswer,
    ConnectionsRequest,
    HostsAnswer,
    HostsRequest,
    RemoveRoutesAnswer,
    RemoveRoutesRequest,
    RoutesAnswer,
    RoutesRequest,
    StatusAnswer,
    StatusRequest,
    StopAnswer,
    StopRequest,
)
from shuttle_protocol.errors import ProtocolError
from shuttle_protocol.firewall_messages import Target
from shuttle_protocol.frames import decode_frame
from shuttle_protocol.rpc import AnswerError, Caller
from shuttle_protocol.schema import Message

from .control_paths import default_control_path, events_path
from .targets import TargetError, parse_targets

A = TypeVar("A", bound=Message)
Subnets = Union[str, Iterable[Union[str, Target]]]
Changes = Callable[[tuple[Target, ...], tuple[Target, ...]], A]  # Add- or RemoveRoutesRequest
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# A change of the routes waits for firewalld (the client gives it 10 s, after a heartbeat
# that may hold the line for a lease): the answer may take longer than the others.
CHANGE_TIMEOUT = 30.0


class ControlClientError(Exception):
    """The client could not be asked, or refused; str() is the text for the user."""


def to_targets(subnets: Subnets) -> tuple[Target, ...]:
    """Targets from command-line text ("10.1.0.0/16", "[fd00::]/64:80-90", a host name,
    resolved here and now) or (network, first port, last port) tuples, in order, once each."""
    items = [subnets] if isinstance(subnets, str) else list(subnets)
    found: list[Target] = []
    for item in items:
        if isinstance(item, str):
            try:
                found.extend(parse_targets([item]))
            except TargetError as exc:
                raise ControlClientError(str(exc)) from None
        else:
            network, first, last = item
            found.append((network, first, last))
    return tuple(dict.fromkeys(found))


class ControlClient:
    """The control sockets of the shuttle-client at path (default: default_control_path()).

    Every request waits at most timeout seconds for its answer; each method raises
    ControlClientError when there is no client, it does not answer in time, or it refuses.
    """

    def __init__(self, path: str | None = None, timeout: float = 5.0) -> None:
        self.path = path if path is not None else default_control_path()
        self.timeout = timeout
        self._requests: zmq.Socket[bytes] | None = None
        self._events: zmq.Socket[bytes] | None = None
        self._caller = Caller(PAIRS)

    def status(self) -> StatusAnswer:
        """The tunnel's state and totals."""
        return self._ask(StatusRequest(), StatusAnswer)

    def connections(self) -> ConnectionsAnswer:
        """The open connections and UDP flows, with their bytes each way."""
        return self._ask(ConnectionsRequest(), ConnectionsAnswer)

    def routes(self) -> RoutesAnswer:
        """What is captured: subnets, excludes, and the nameservers whose DNS is."""
        return self._ask(RoutesRequest(), RoutesAnswer)

    def add(self, subnets: Subnets = (), excludes: Subnets = ()) -> AddRoutesAnswer:
        """Capture these subnets too, and exclude these, from now on; what is captured now.
        Text as on the command line, or Target tuples (see to_targets)."""
        request = self._build(AddRoutesRequest, subnets, excludes)
        return self._ask(request, AddRoutesAnswer, CHANGE_TIMEOUT)

    def remove(self, subnets: Subnets = (), excludes: Subnets = ()) -> RemoveRoutesAnswer:
        """Stop capturing these subnets, and stop excluding these (each as it was added)."""
        request = self._build(RemoveRoutesRequest, subnets, excludes)
        return self._ask(request, RemoveRoutesAnswer, CHANGE_TIMEOUT)

    def hosts(self) -> HostsAnswer:
        """The (name, address) pairs -H put into the hosts file."""
        return self._ask(HostsRequest(), HostsAnswer)

    def stop(self) -> None:
        """Stop the client as SIGTERM does; returns once it has said it is stopping."""
        self._ask(StopRequest(), StopAnswer)

    def events(self, timeout: float | None = None) -> Iterator[tuple[int, Message]]:
        """(sequence number, event) pairs as the client publishes them, from now on; each
        event one of control_messages.EVENTS. Sequence numbers grow by one: a gap is that
        many events missed. With timeout, ControlClientError when none comes for that long.

        The subscription is made here, before the iterator runs, but it reaches the client
        a moment later: events of that moment are not seen (the first number says so).
        """
        if self._events is None:
            sock = self._open(zmq.SUB, events_path(self.path))
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            self._events = sock
        return self._event_stream(self._events, timeout)

    def close(self) -> None:
        """Close the sockets; the client may be used again (it reconnects)."""
        for sock in (self._requests, self._events):
            if sock is not None:
                sock.close(linger=0)
        self._requests = self._events = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _build(self, kind: Changes[A], subnets: Subnets, excludes: Subnets) -> A:
        try:
            return kind(to_targets(subnets), to_targets(excludes))
        except ProtocolError as exc:
            raise ControlClientError(str(exc)) from None

    def _ask(self, request: Message, answer_type: type[A], at_least: float = 0.0) -> A:
        """Send one request and wait for the answer with its id (timeout seconds, or
        at_least if that is longer)."""
        if self._requests is None:
            self._requests = self._open(zmq.DEALER, self.path)
        sock = self._requests
        call = self._caller.call(request, answer_type)
        timeout = max(self.timeout, at_least)
        deadline = time.monotonic() + timeout
        try:
            # A connecting DEALER queues at once (its pipe exists before the peer does).
            sock.send(call.frame(), zmq.NOBLOCK)
        except zmq.Again:
            raise ControlClientError(self._no_answer(timeout)) from None
        while (remaining := deadline - time.monotonic()) > 0:
            if not sock.poll(max(1, round(remaining * 1000)), zmq.POLLIN):
                break
            try:
                answer = call.receive(sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                continue
            except AnswerError as exc:
                raise ControlClientError(exc.from_peer("the client", " said")) from None
            if answer is not None:
                return answer
        raise ControlClientError(self._no_answer(timeout))

    def _event_stream(
        self, sock: zmq.Socket[bytes], timeout: float | None
    ) -> Iterator[tuple[int, Message]]:
        while True:
            if timeout is not None and not sock.poll(max(1, round(timeout * 1000)), zmq.POLLIN):
                raise ControlClientError(
                    f"no event from the client at {self.path} in {timeout:g} s"
                )
            try:
                sequence, event = decode_frame(sock.recv())
            except ProtocolError as exc:
                raise ControlClientError(f"the client sent a malformed event: {exc}") from None
            if not isinstance(event, EVENTS):
                raise ControlClientError(f"the client published {type(event).__name__}")
            yield sequence, event

    def _open(self, kind: int, path: str) -> zmq.Socket[bytes]:
        check_socket(path, self.timeout)
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(kind)
        sock.linger = 0
        try:
            sock.connect("ipc://" + path)
        except zmq.ZMQError as exc:
            sock.close()
            raise ControlClientError(f"cannot connect to {path}: {exc}") from None
        return sock

    def _no_answer(self, timeout: float) -> str:
        if not os.path.exists(self.path):
            return f"the client at {self.path} has gone (its socket is no more)"
        return (
            f"no answer from the client at {self.path} within {timeout:g} s: it is busy "
            "or hung, or it refused us (only the uid that runs it may connect)"
        )


def check_socket(path: str, timeout: float) -> None:
    """ControlClientError unless a process of our uid listens on the unix socket at path.

    libzmq connects in the background and retries quietly, so a missing or stale socket, or
    one whose owner's ZAP handler will refuse us, would only ever look like a timeout.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ControlClientError(
            f"no shuttle-client is running at {path} (no such socket; "
            "started with another --control?)"
        ) from None
    except OSError as exc:
        raise ControlClientError(f"cannot reach {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ControlClientError(f"{path} is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            raise ControlClientError(
                f"no shuttle-client is running at {path} (its socket was left behind)"
            ) from None
        except OSError as exc:
            raise ControlClientError(f"cannot reach {path}: {exc.strerror or exc}") from None
        # The kernel's word on who listens there, as the client's ZAP handler will check us.
        _pid, uid, _gid = _UCRED.unpack(
            probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    if uid != os.getuid():
        raise ControlClientError(
            f"the socket {path} is not ours: uid {uid} listens there, and a shuttle-client "
            "answers its own uid only"
        )

"""The client's side of the firewalld RPC: open a session, keep its lease, close it.

One zmq DEALER on firewalld's ipc socket, one request in flight at a time; answers are
matched to requests by id, and stale answers (to a request that timed out) are dropped.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

import zmq
import zmq.asyncio
from shuttle_protocol.errors import ProtocolError
from shuttle_protocol.firewall_messages import (
    ALL_PORTS,
    ANY_OWNER,
    CloseSessionRequest,
    ErrorAnswer,
    HeartbeatAnswer,
    HeartbeatRequest,
    OpenSessionAnswer,
    OpenSessionRequest,
    Target,
)
from shuttle_protocol.frames import decode_frame, encode_frame
from shuttle_protocol.schema import Message

CLOSE_TIMEOUT = 1.0


def _target(item: Target | str) -> Target:
    """A target as the protocol carries it; a network alone means all its ports."""
    if isinstance(item, str):
        return (item, *ALL_PORTS)
    return (item[0], item[1], item[2])


class FirewallError(Exception):
    """firewalld refused or failed; str() is the user-facing text."""


class FirewallSession:
    """One session with shuttle-firewalld: its rules stay while heartbeats keep coming."""

    def __init__(self, socket_path: str) -> None:
        self._path = socket_path
        self._socket: zmq.asyncio.Socket | None = None
        self._lock: asyncio.Lock | None = None  # made in the loop that uses it (Python 3.9)
        self._next_id = 1
        self._session: str | None = None
        self._lease = 0.0

    @property
    def session(self) -> str | None:
        """The session id while the session is open."""
        return self._session

    async def open(  # noqa: PLR0917  (the request's fields, in its order; main passes them so)
        self,
        method: str,
        port: int,
        subnets: Sequence[Target | str],
        excludes: Sequence[Target | str],
        uid: int | None = None,
        gid: int = ANY_OWNER,
        forward: bool = False,
        timeout: float = 5.0,
    ) -> str:
        """Ask firewalld to capture the subnets (minus excludes) into port; the method applied.

        subnets and excludes: (network, first port, last port) targets, or networks as text
        for all ports. uid: whose traffic (default: our own; ANY_OWNER: everybody's), gid: of
        which group (ANY_OWNER: any); forward: also traffic routed through this host. More
        than our own traffic needs root or firewalld's policy file.
        """
        if self._session is not None:
            raise FirewallError("this firewall session is already open")
        request = OpenSessionRequest(
            method,
            port,
            tuple(map(_target, subnets)),
            tuple(map(_target, excludes)),
            os.getuid() if uid is None else uid,
            gid,
            forward,
        )
        answer = await self._request(request, timeout)
        if not isinstance(answer, OpenSessionAnswer):
            raise FirewallError(f"shuttle-firewalld answered {type(answer).__name__}")
        self._session, self._lease = answer.session, answer.lease
        return answer.method

    async def run_heartbeats(self) -> None:
        """Renew the lease every third of it, until cancelled; FirewallError if it is lost."""
        if self._session is None:
            raise FirewallError("no firewall session is open")
        interval = self._lease / 3
        while True:
            await asyncio.sleep(interval)
            try:
                # Waiting up to a whole lease: a late answer is fine as long as it comes.
                answer = await self._request(HeartbeatRequest(self._session), self._lease)
            except FirewallError as exc:
                raise FirewallError(f"lost the firewall session: {exc}") from None
            if not isinstance(answer, HeartbeatAnswer):
                raise FirewallError(f"shuttle-firewalld answered {type(answer).__name__}")

    async def close(self) -> None:
        """Close the session (best effort: its lease ends it anyway) and the socket."""
        try:
            if self._session is not None:
                # The outer bound covers waiting for a heartbeat that holds the socket.
                await asyncio.wait_for(
                    self._request(CloseSessionRequest(self._session), CLOSE_TIMEOUT), CLOSE_TIMEOUT
                )
        except (FirewallError, ProtocolError, zmq.ZMQError, OSError, asyncio.TimeoutError):
            pass  # nothing to tell: the rules go when the lease runs out
        finally:
            self._session = None
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None

    async def _request(self, request: Message, timeout: float) -> Message:
        """Send one request and wait for its answer; an ErrorAnswer becomes FirewallError."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            socket = self._connect()
            request_id = self._next_id
            self._next_id += 1
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            try:
                # Sending only queues, unless the queue is full: bounded all the same.
                await asyncio.wait_for(socket.send(encode_frame(request_id, request)), timeout)
            except asyncio.TimeoutError:
                raise FirewallError(self._unreachable()) from None
            while (remaining := deadline - loop.time()) > 0:
                try:
                    data = await asyncio.wait_for(socket.recv(), remaining)
                except asyncio.TimeoutError:
                    break
                try:
                    answer_id, answer = decode_frame(data)
                except ProtocolError as exc:
                    raise FirewallError(
                        f"shuttle-firewalld sent a malformed answer: {exc}"
                    ) from None
                if answer_id != request_id:
                    continue  # the late answer to a request that timed out
                if isinstance(answer, ErrorAnswer):
                    raise FirewallError(f"shuttle-firewalld: {answer.text}")
                return answer
            raise FirewallError(self._unreachable())

    def _connect(self) -> zmq.asyncio.Socket:
        if self._socket is not None:
            return self._socket
        # libzmq connects in the background and retries quietly, so check what it cannot say.
        if not os.path.exists(self._path) or not os.access(self._path, os.R_OK | os.W_OK):
            raise FirewallError(self._unreachable())
        socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        socket.linger = 0
        try:
            socket.connect("ipc://" + self._path)
        except zmq.ZMQError as exc:
            socket.close()
            raise FirewallError(f"{self._unreachable()}: {exc}") from None
        self._socket = socket
        return socket

    def _unreachable(self) -> str:
        return (
            f"cannot reach shuttle-firewalld at {self._path}: is it running? "
            "(start it as root: shuttle-firewalld)"
        )

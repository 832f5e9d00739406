"""The daemon's loop: the ROUTER socket for requests, our ZAP handler, the count of
connections, the fd socket that hands transparent sockets over; and the worker thread that
applies rules and ends sessions (lease expiry, exited openers).

One zmq.Poller in the main thread answers every quick request itself and hands those that
change rules (and any big frame) to the worker (worker.py), whose answers it sends when they
are ready: no request can hold up a heartbeat. A big OpenSession or UpdateSession is checked
and its rule text made by a child process (offload.py), whose seconds of Python do not hold
this process's GIL. Whatever bytes arrive, each gets an answer and
the loop goes on; only a signal ends it.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from shuttle_protocol.errors import RemoteProtocolError
from shuttle_protocol.firewall_messages import (
    PAIRS,
    TOKEN_LEN,
    OpenSessionRequest,
    SocketsHandover,
    UpdateSessionRequest,
)
from shuttle_protocol.frames import MAX_FRAME, MAX_ITEMS, decode_frame, encode_frame, frame_message
from shuttle_protocol.schema import Message
from shuttle_protocol.stream import new_unpacker, unpack_errors
from shuttle_protocol.zap import PID_PROPERTY, ZAP_ENDPOINT, Peer, anyone, zap_reply

from . import offload, requests
from .connections import MAX_CONNECTIONS, UCRED, Connections
from .errors import RequestError, StartupError
from .handover import Grants, HandoverRefused
from .log_budget import LogBudget
from .prepared import Prepared
from .sessions import Sessions
from .worker import Job, Worker

log = logging.getLogger(__name__)

POLL_MS = 500  # the longest a signal or a run-out lease waits for the loop's attention
BATCH = 100  # messages taken from one socket per turn, so expiry and signals get turns too
FDS_SUFFIX = ".fds"  # the fd socket's path is the zmq socket's plus this
MAX_WAITING = 64  # fd socket connections that have not sent their token yet
MAX_WAITING_PER_UID = 8  # of which one uid's: it cannot crowd out the others
WAIT_FOR_TOKEN = 5.0  # seconds a connection may take to send it
DOMAIN = b"shuttle"  # our ZAP domain
# A member's frame is at most this long, root's MAX_FRAME: enough for the largest IPv4
# request (50,000 subnets and 50,000 excludes, each a /32 on a port range: 2.6 MB), and it
# bounds what one member's requests make firewalld decode and hold while they wait.
MEMBER_MAX_FRAME = 3 * 1024 * 1024
QUICK_FRAME = 64 * 1024  # a frame longer than this goes to the worker, whatever it is
# Requests whose long frames a child checks and prepares (offload.py): those with targets.
PREPARED = frozenset({OpenSessionRequest.TAG, UpdateSessionRequest.TAG})
# What peek and refuse_frame read of a frame: a request id (9 bytes at most in msgpack), a
# tag, and a session id (32 characters) after the array's header.
HEAD = 64
# Messages libzmq queues per connection before it stops reading from it (its default is
# 1,000 of up to MAX_FRAME): a client sends one request at a time. Not 1: libzmq queues the
# ZAP credentials of a connection as a message too, and with 1 no request ever comes in.
RCVHWM = 2
HANDSHAKE_MS = 5000  # a connection silent this long after connecting is dropped by libzmq
# Connections the kernel queues for libzmq's accept (libzmq's default), or fewer: libzmq still
# accepts those queued when the door closes, so at most a quarter of the room above the
# point where it closes.
LISTEN_BACKLOG = 100
# After a look at the descriptors, the door keeper lets libzmq take what waits for this long
# before it looks again: a burst costs it a look a millisecond, and an idle listener none.
DOOR_LOOK_S = 0.001
# The first byte of a msgpack array: fixarray, array 16, array 32.
ARRAY_MARKERS = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}


def answer(sessions: Sessions, uid: int, payload: bytes, pid: int | None = None) -> bytes:
    """The answer frame to one request frame from uid (process pid). Never raises."""
    if len(payload) > QUICK_FRAME:
        tag, first = peek(payload)
        if tag in PREPARED:  # the child decodes it, whatever its first field
            update = tag == UpdateSessionRequest.TAG
            return answer_prepared(sessions, uid, payload, pid, update=update, first=first or "")
    try:
        if len(payload) > QUICK_FRAME:
            request_id, request = decode_in_pieces(payload)
        else:
            request_id, request = decode_frame(payload)
    except RemoteProtocolError as exc:
        log.info("bad request from uid %d: %s", uid, exc)
        return PAIRS.refuse_frame(head(payload), f"bad request: {exc}")
    return _serve(sessions, uid, request_id, request, pid)


def answer_prepared(
    sessions: Sessions, uid: int, payload: bytes, pid: int | None, *, update: bool, first: str
) -> bytes:
    """answer()'s way with a long OpenSession or UpdateSession (update): a child checks it
    and prepares its targets (offload.py) for the method the session has (first: its id) or
    the request asks for (first: the method; "" if the frame's head holds no text there);
    the rest as for any request. Never raises."""
    try:
        ready = offload.prepare(payload, _method_for(sessions, uid, update, first), uid)
        request_id, request = ready.request(UpdateSessionRequest if update else OpenSessionRequest)
        if isinstance(request, UpdateSessionRequest) and request.session != first:
            raise RequestError("the request's check said something else: another session")
    except RequestError as exc:
        log.info("refused a request of uid %d: %s", uid, exc)
        return PAIRS.refuse_frame(head(payload), str(exc))
    except Exception as exc:  # our bug, as in _serve
        log.exception("internal error on a long request from uid %d", uid)
        return PAIRS.refuse_frame(head(payload), f"internal error: {type(exc).__name__}: {exc}")
    prepared = (ready.subnets, ready.excludes)
    return _serve(sessions, uid, request_id, request, pid, prepared=prepared)


def _method_for(sessions: Sessions, uid: int, update: bool, first: str) -> str:
    """The method a long request's targets are prepared for: its session's, or the one it
    asks for. nft if there is none: the request is refused after the child's check, as in
    answer(), so that a malformed frame is answered "bad request" first."""
    try:
        if update:
            with sessions.lock:
                return sessions.owned(first, uid).method
        return sessions.choose(first)
    except RequestError:
        return "nft"


def _serve(
    sessions: Sessions,
    uid: int,
    request_id: int,
    request: Message,
    pid: int | None,
    *,
    prepared: tuple[Prepared, Prepared] | None = None,
) -> bytes:
    """The answer frame to a decoded request. Never raises."""
    try:
        answered = requests.handle(sessions, uid, request, pid, prepared)
        return PAIRS.reply(request_id, request, answered)
    except RequestError as exc:
        log.info("refused %s from uid %d: %s", type(request).__name__, uid, exc)
        return PAIRS.refuse(request_id, str(exc))
    except Exception as exc:  # our bug: keep serving, and say so in the log with a traceback
        log.exception("internal error on %s from uid %d", type(request).__name__, uid)
        return PAIRS.refuse(request_id, f"internal error: {type(exc).__name__}: {exc}")


def decode_in_pieces(payload: bytes) -> tuple[int, Message]:
    """decode_frame's answer for a long frame (other than those answer_prepared takes), read
    one array item at a time: msgpack holds the GIL for a whole value, and a value of 100,000
    targets held it long enough to stall the loop's thread; between items the loop gets its
    turn."""
    unpacker = new_unpacker(MAX_FRAME, MAX_ITEMS, MAX_FRAME)
    try:
        unpacker.feed(payload)
        values = []
        while unpacker.tell() < len(payload):
            values.append(_read_in_pieces(unpacker, payload))
    except (*unpack_errors(), IndexError) as exc:  # IndexError: an array cut short
        raise RemoteProtocolError(f"malformed frame: {type(exc).__name__}: {exc}") from None
    return frame_message(values)


def _read_in_pieces(unpacker: Any, payload: bytes) -> Any:
    if payload[unpacker.tell()] in ARRAY_MARKERS:
        return tuple(
            _read_in_pieces(unpacker, payload) for _ in range(unpacker.read_array_header())
        )
    return unpacker.unpack()


def head(payload: bytes | memoryview) -> memoryview:
    """The start of a frame, where its request id, tag and session are (HEAD), without a
    copy: msgpack's feed() copies what it is given, and the loop fed it whole frames, 4 MiB
    each time a member's over-long frame or a big request answered busy came in."""
    return memoryview(payload)[:HEAD]


def peek(payload: bytes | memoryview) -> tuple[object, str | None]:
    """(tag, session) of a request frame, read from its head without decoding the rest: the
    session is the first field if it is text (the session id of requests that name one) and
    fits in the head. (None, None) if the frame does not even start as [request id, tag, ...]."""
    # A buffer of HEAD: msgpack allocates one of max_buffer_size (at most 1 MiB) at once.
    unpacker = new_unpacker(MAX_FRAME, MAX_ITEMS, HEAD)
    try:
        unpacker.feed(head(payload))
        items = unpacker.read_array_header()
        if items < 2:
            return None, None
        unpacker.skip()  # the request id
        tag = unpacker.unpack()
    except unpack_errors():
        return None, None
    try:
        first = unpacker.unpack() if items > 2 else None
    except unpack_errors():  # longer than a session id: not one
        first = None
    return tag, first if type(first) is str else None


def caller_uid(frame: zmq.Frame) -> int | None:
    """The uid our ZAP handler gave this connection (from the kernel), or None."""
    return _property(frame, "User-Id")


def caller_pid(frame: zmq.Frame) -> int | None:
    """The pid our ZAP handler gave this connection (from the kernel), or None."""
    return _property(frame, PID_PROPERTY)


def _property(frame: zmq.Frame, name: str) -> int | None:
    try:
        return int(frame.get(name))
    except (zmq.ZMQError, ValueError):
        return None


class Server:
    """The listening socket file and the zmq sockets behind it, from bind to removal."""

    def __init__(
        self,
        path: str,
        gid: int,
        sessions: Sessions,
        max_connections: int = MAX_CONNECTIONS,
        file_limit: int = 1024,
        *,
        owner: int = 0,
        admit: Callable[[Peer], str | None] = anyone,
    ) -> None:
        """file_limit: the open file limit in force (see _watch_descriptors); owner and
        gid: the socket files' owner and group (mode 0660); admit: the ZAP handler's test
        of each caller (zap_reply's)."""
        self.path = path
        self._owner = owner
        self._gid = gid
        self._admit = admit
        self._sessions = sessions
        self._file_limit = file_limit
        self._pause_at, self._resume_at = file_limit * 3 // 4, file_limit * 5 // 8
        self._crowded_at = file_limit * 3 // 8  # from here the door keeper looks each turn
        self._paused = False
        self._hidden = ""  # where the socket file is while paused (_hide)
        # _watch_descriptors runs in the loop and in the door keeper's thread (_keep_door).
        self._door = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._keeper_wake = (-1, -1)  # a pipe: a byte in it stops the keeper at once
        self._listener = -1  # the listening socket's descriptor: libzmq's from bind on
        self._worker = Worker(sessions, functools.partial(answer, sessions))
        self._log_budget = LogBudget()
        _prepare_path(path)
        _remove_hiding_places(path)
        self._context = zmq.Context()
        # The ZAP handler must be bound before the ROUTER accepts anyone.
        self._zap = self._context.socket(zmq.REP)
        self._zap.linger = 0
        self._zap.bind(ZAP_ENDPOINT)
        self._router = self._context.socket(zmq.ROUTER)
        self._router.linger = 0
        # With a ZAP domain set, even the NULL mechanism asks ZAP about each connection.
        self._router.zap_domain = DOMAIN
        # Bigger messages cannot be valid; libzmq drops such a peer before buffering it.
        self._router.maxmsgsize = MAX_FRAME
        self._router.rcvhwm = RCVHWM
        self._router.handshake_ivl = HANDSHAKE_MS
        self._connections = Connections(self._router, path, max_connections)
        try:
            self._inode = self._listen()
        except (zmq.ZMQError, OSError) as exc:
            self._close_sockets()
            raise StartupError(f"cannot listen on ipc://{path}: {exc}") from None
        self._fds: FdServer | None = None
        try:
            if sessions.grants.path:
                self._fds = FdServer(
                    sessions.grants.path, gid, sessions.grants, lock=sessions.lock, owner=owner
                )
        except BaseException:
            self.close()
            raise

    def _listen(self) -> int:
        """Bind the ROUTER to the socket file, root's and the group's; the file's inode.
        The listening socket is ours, handed to libzmq (ZMQ_USE_FD), so that the door keeper
        knows its descriptor; libzmq closes it with the ROUTER."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # The socket file appears at bind; the umask keeps it private until chmod below.
            old_umask = os.umask(0o077)
            try:
                listener.bind(self.path)
            finally:
                os.umask(old_umask)
            listener.listen(max(1, min(LISTEN_BACKLOG, (self._file_limit - self._pause_at) // 4)))
            listener.setblocking(False)  # libzmq's accept must never wait
            self._router.setsockopt(zmq.USE_FD, listener.fileno())
            self._router.bind("ipc://" + self.path)
        except BaseException:
            listener.close()
            raise
        self._listener = listener.detach()
        inode = os.stat(self.path).st_ino
        os.chown(self.path, self._owner, self._gid)
        os.chmod(self.path, 0o660)
        return inode

    def _watch_descriptors(self) -> None:
        """Stop taking connections while three quarters of the open file limit are in use
        (the caps of main.descriptor_budget keep well below that), and take them again below
        five eighths. libzmq accepts every connection as it comes, faster than the monitor's
        news of them, and aborts when accept() meets the limit: so a burst of connections
        must meet a closed door first. Meanwhile the connections made go on being served.
        The loop and the door keeper both call it: one at a time."""
        with self._door:
            self._look_at_descriptors()

    def _look_at_descriptors(self) -> None:
        """_watch_descriptors' look, under its lock."""
        if not self._paused and _lowest_free(self._worker.fileno()) < self._pause_at:
            return  # the quick answer: fewer in use, and no more
        used = len(os.listdir("/proc/self/fd"))
        if not self._paused and used >= self._pause_at:
            try:
                self._hidden = _hide(self.path)
            except OSError as exc:
                log.warning("cannot stop listening on ipc://%s: %s", self.path, exc)
                return
            self._paused = True
            log.warning(
                "%d open files, of %d allowed: not listening on ipc://%s until some "
                "connections end",
                used,
                self._file_limit,
                self.path,
            )
        elif self._paused and used < self._resume_at:
            try:
                _show(self._hidden, self.path)
            except OSError as exc:
                log.warning("cannot listen on ipc://%s again yet: %s", self.path, exc)
                return
            self._paused = False
            log.warning("%d open files: listening on ipc://%s again", used, self.path)

    def _serve_connections(self, ready: bool) -> None:
        """The monitor's events if it has some (ready), with a look at the descriptors every
        few events, so that a burst cannot outrun it; and one more while not listening."""
        if ready:
            while self._connections.serve():
                self._watch_descriptors()
        if ready or self._paused:
            self._watch_descriptors()

    def _keep_door(self) -> None:
        """The door keeper's thread: a look at the descriptors whenever a connection waits
        for libzmq's accept, and every few milliseconds while half the descriptors where the
        door closes are in use (libzmq may take a connection before the keeper wakes). The
        loop looks only between the things it serves, and a burst that came while it was
        busy (a slow request, a loaded machine) took libzmq to the limit before it looked
        (the abort that test_limits' grab met once in many runs). This narrows that window
        to the keeper's own wakeups (which need the GIL); it does not close it: libzmq's
        accepts are its own."""
        stop = self._keeper_wake[0]
        waiting, stopping = select.poll(), select.poll()
        waiting.register(self._listener, select.POLLIN)
        for poll in (waiting, stopping):
            poll.register(stop, select.POLLIN)
        while True:
            crowded = self._paused or _lowest_free(self._worker.fileno()) >= self._crowded_at
            ready = dict(waiting.poll(DOOR_LOOK_S * 1000 if crowded else POLL_MS))
            if stop in ready:
                return
            if ready or crowded:
                try:
                    self._watch_descriptors()
                except OSError as exc:  # out of descriptors for a look: the next may have one
                    log.warning("cannot look at the open files: %s", exc)
                if stopping.poll(DOOR_LOOK_S * 1000):
                    return

    def _stop_keeper(self) -> None:
        """Before libzmq closes the listener, whose descriptor the keeper polls."""
        if self._keeper is not None:
            os.write(self._keeper_wake[1], b"\0")
            self._keeper.join()
            self._keeper = None
            for fd in self._keeper_wake:
                os.close(fd)
            self._keeper_wake = (-1, -1)

    def run(self, stopping: Callable[[], bool]) -> None:
        """Serve until stopping() is true; the worker closes expired sessions meanwhile."""
        poller = zmq.Poller()
        poller.register(self._connections.monitor, zmq.POLLIN)
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._worker.fileno(), zmq.POLLIN)
        if self._fds is not None:
            self._fds.register(poller)
        self._worker.start()
        self._keeper_wake = os.pipe()
        self._keeper = threading.Thread(target=self._keep_door, name="door", daemon=True)
        self._keeper.start()
        try:
            while not stopping():
                ready = dict(poller.poll(POLL_MS))
                # Connections first: a connection over a cap ends before it is served.
                self._serve_connections(self._connections.monitor in ready)
                if self._zap in ready:
                    self._serve_zap()
                if self._router in ready:
                    self._serve_requests()
                if self._worker.fileno() in ready:
                    for identity, reply in self._worker.answers():
                        self._send(identity, reply)
                self._log_budget.settle()
                if self._fds is not None:
                    for fd in ready:
                        # zmq.Poller names other sockets by fd
                        if isinstance(fd, int) and fd != self._worker.fileno():
                            self._fds.serve(fd, poller)
                    self._fds.expire(poller)
        finally:
            self._stop_keeper()
            self._worker.stop()

    def close(self) -> None:
        """Close the sockets and remove the socket files, if they are still ours."""
        if self._fds is not None:
            self._fds.close()
        self._close_sockets()
        if self._paused:
            _remove_socket_file(self._hidden, self._inode)
            _remove_hiding_place(self._hidden)
        else:
            _remove_socket_file(self.path, self._inode)

    def _close_sockets(self) -> None:
        self._stop_keeper()
        self._connections.close()
        self._router.close()
        self._zap.close()
        self._context.term()

    def _serve_zap(self) -> None:
        for _ in range(BATCH):
            try:
                frames = self._zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = zap_reply(frames, DOMAIN, self._admit)
            if reply[2] == b"200":
                log.debug("connection from uid %s", reply[4].decode())
            else:
                log.warning("refused a connection: %s", reply[3].decode())
            self._zap.send_multipart(reply)

    def _serve_requests(self) -> None:
        for _ in range(BATCH):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = frames[0].bytes
            uid, pid = caller_uid(frames[-1]), caller_pid(frames[-1])
            if len(frames) != 2:
                log.info("bad request from uid %s: %d frames", uid, len(frames) - 1)
                reply = PAIRS.refuse_frame(None, f"a request is one frame, not {len(frames) - 1}")
            elif uid is None or pid is None:
                log.warning("a request without the caller's uid or pid")  # ZAP runs for everyone
                reply = PAIRS.refuse_frame(
                    head(frames[1].buffer), "who are you? no peer credentials"
                )
            else:
                found = self._route(identity, uid, pid, frames[1])
                if found is None:
                    continue  # the worker answers
                reply = found
            self._send(identity, reply)

    def _route(self, identity: bytes, uid: int, pid: int, frame: zmq.Frame) -> bytes | None:
        """The answer to a request frame, made here; or None: the worker makes it."""
        size = len(frame)
        if uid != 0 and size > MEMBER_MAX_FRAME:  # refused without a copy of it
            if self._log_budget.allow(uid):
                log.info("refused a frame of %d bytes from uid %d", size, uid)
            return PAIRS.refuse_frame(
                head(frame.buffer),
                f"bad request: a request of a uid other than root's is at most "
                f"{MEMBER_MAX_FRAME} bytes, this one is {size}",
            )
        tag, session = peek(frame.buffer)
        if size <= QUICK_FRAME and not requests.is_slow(tag):
            return answer(self._sessions, uid, frame.bytes, pid)
        # Asked before the frame is copied: a member resending a big request while the
        # worker is busy with its others costs the loop its head alone.
        refusal = self._worker.full(uid) or self._worker.submit(
            Job(identity, uid, frame.bytes, session, pid)
        )
        if refusal is None:
            return None
        if self._log_budget.allow(uid):
            log.info("refused a request of uid %d: %s", uid, refusal)
        return PAIRS.refuse_frame(head(frame.buffer), refusal)

    def _send(self, identity: bytes, reply: bytes) -> None:
        try:
            # A ROUTER drops what it cannot deliver (peer gone, queue full): never blocks.
            self._router.send_multipart([identity, reply], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("an answer was not sent: %s", exc)


@dataclass(eq=False)
class Waiting:
    """A connection to the fd socket that has not sent its whole token yet."""

    conn: socket.socket
    uid: int
    pid: int
    deadline: float
    token: bytearray = field(default_factory=bytearray)


class FdServer:
    """The fd socket: a unix stream socket beside the zmq one, same directory, mode and
    group. A client connects, sends a token from a zmq answer, and gets one SocketsHandover
    frame with the sockets in SCM_RIGHTS (if the kernel says it is the token's owner), then
    the end of the connection. Anything else: the end of the connection, and one log line.

    Non-blocking throughout, in the loop's poller, so no client can stall the daemon; bounded:
    MAX_WAITING connections at once (MAX_WAITING_PER_UID of one uid), TOKEN_LEN bytes read
    from each, WAIT_FOR_TOKEN seconds.
    """

    def __init__(
        self,
        path: str,
        gid: int,
        grants: Grants,
        clock: Callable[[], float] = time.monotonic,
        *,
        lock: threading.Lock | None = None,
        owner: int = 0,
    ) -> None:
        """lock: Sessions.lock, held while a token is redeemed and its sockets sent, so that
        the worker never closes a session's sockets under our feet."""
        self.path = path
        self._grants = grants
        self._lock = lock if lock is not None else threading.Lock()
        self._clock = clock
        self._waiting: dict[int, Waiting] = {}  # by file descriptor, as the poller says
        _prepare_path(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o077)  # private until chmod below, as the zmq socket
        try:
            self._listener.bind(path)
        except OSError as exc:
            self._listener.close()
            raise StartupError(f"cannot listen on {path}: {exc}") from None
        finally:
            os.umask(old_umask)
        self._inode = os.stat(path).st_ino
        try:
            os.chown(path, owner, gid)
            os.chmod(path, 0o660)
            self._listener.listen(MAX_WAITING)
            self._listener.setblocking(False)
        except BaseException:
            self.close()
            raise

    def register(self, poller: zmq.Poller) -> None:
        poller.register(self._listener.fileno(), zmq.POLLIN)

    def serve(self, fd: int, poller: zmq.Poller) -> None:
        """Whatever the poller says is ready: the listener, or a waiting connection."""
        if fd == self._listener.fileno():
            self._accept(poller)
        elif fd in self._waiting:
            self._read(self._waiting[fd], poller)

    def expire(self, poller: zmq.Poller) -> None:
        now = self._clock()
        for waiting in list(self._waiting.values()):
            if waiting.deadline <= now:
                log.warning(
                    "fd socket: uid %d (pid %d) sent no token in %g s",
                    waiting.uid,
                    waiting.pid,
                    WAIT_FOR_TOKEN,
                )
                self._drop(waiting, poller)

    def close(self) -> None:
        for waiting in self._waiting.values():
            waiting.conn.close()
        self._waiting.clear()
        self._listener.close()
        _remove_socket_file(self.path, self._inode)

    def _accept(self, poller: zmq.Poller) -> None:
        for _ in range(BATCH):
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors, say: the client will time out
                log.warning("fd socket: cannot accept: %s", exc)
                return
            if len(self._waiting) >= MAX_WAITING:
                log.warning("fd socket: %d connections wait already; closed one", MAX_WAITING)
                conn.close()
                continue
            try:
                conn.setblocking(False)
                # The kernel's word on who connected, as it was at connect().
                pid, uid, _gid = UCRED.unpack(
                    conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
                )
            except OSError as exc:
                log.warning("fd socket: no peer credentials: %s", exc)
                conn.close()
                continue
            if (
                sum(1 for other in self._waiting.values() if other.uid == uid)
                >= MAX_WAITING_PER_UID
            ):
                log.warning(
                    "fd socket: uid %d has %d connections waiting already; closed one",
                    uid,
                    MAX_WAITING_PER_UID,
                )
                conn.close()
                continue
            self._waiting[conn.fileno()] = Waiting(conn, uid, pid, self._clock() + WAIT_FOR_TOKEN)
            poller.register(conn.fileno(), zmq.POLLIN)

    def _read(self, waiting: Waiting, poller: zmq.Poller) -> None:
        conn = waiting.conn
        try:
            data = conn.recv(TOKEN_LEN - len(waiting.token))  # never more than a token
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("fd socket: uid %d (pid %d): %s", waiting.uid, waiting.pid, exc)
            self._drop(waiting, poller)
            return
        if not data:
            log.warning(
                "fd socket: uid %d (pid %d) left before its token", waiting.uid, waiting.pid
            )
            self._drop(waiting, poller)
            return
        waiting.token += data
        if len(waiting.token) == TOKEN_LEN:
            self._drop(waiting, poller, close=False)
            try:
                with self._lock:
                    self._hand_over(conn, waiting)
            finally:
                conn.close()

    def _hand_over(self, conn: socket.socket, waiting: Waiting) -> None:
        token = waiting.token.decode("ascii", "replace")
        try:
            session, sockets = self._grants.take(token, waiting.uid)
        except HandoverRefused as exc:
            log.warning("fd socket: refused uid %d (pid %d): %s", waiting.uid, waiting.pid, exc)
            return
        sent = False
        try:
            kinds = tuple(kind for kind, _ in sockets)
            frame = encode_frame(0, SocketsHandover(kinds))
            # One sendmsg: the frame and every descriptor together. A fresh connection's
            # buffer is empty, so a frame this small never meets EAGAIN.
            socket.send_fds(conn, [frame], [sock.fileno() for _, sock in sockets])
            sent = True
            log.debug(
                "fd socket: handed %s to uid %d (pid %d)",
                ", ".join(kinds),
                waiting.uid,
                waiting.pid,
            )
        except OSError as exc:
            log.warning(
                "fd socket: sending to uid %d (pid %d) failed: %s", waiting.uid, waiting.pid, exc
            )
        finally:
            # Sent: the client has its own copies now. Not sent: the session's listeners
            # wait for another token (it has no others); a reply socket is asked for anew.
            if sent or not self._grants.give_back(session, sockets):
                for _, sock in sockets:
                    sock.close()

    def _drop(self, waiting: Waiting, poller: zmq.Poller, close: bool = True) -> None:
        """Stop waiting for this connection (before it is closed: fds are reused)."""
        del self._waiting[waiting.conn.fileno()]
        poller.unregister(waiting.conn.fileno())
        if close:
            waiting.conn.close()


def _lowest_free(fd: int) -> int:
    """The lowest free descriptor now: a duplicate of fd takes it, so every one below is in
    use (libzmq's accepts take them from the lowest up). The monitor's news of those accepts
    came too late for this: under load its events lagged behind while libzmq accepted up to
    the limit, and aborted."""
    try:
        probe = os.dup(fd)
    except OSError:  # none left
        return sys.maxsize
    os.close(probe)
    return probe


def _hide(path: str) -> str:
    """Close the door of the listening socket at path and return where its file is now.

    Not zmq's unbind: libzmq ends every connection it accepted on an endpoint it unbinds
    (tried here with libzmq 4.3.4), so one member's burst of connections cut every other
    client off. The listener stays; its file goes into a directory of root's alone, and its
    mode becomes 0600, for a connect() through a path opened before (/proc/self/fd/N of
    an O_PATH descriptor) passes over the directories but not over the file's own mode.
    A new client finds no socket file, as when firewalld is not running.
    """
    os.chmod(path, 0o600)
    try:
        place = tempfile.mkdtemp(prefix=_hiding_prefix(path), dir=os.path.dirname(path))
        hidden = os.path.join(place, os.path.basename(path))
        os.rename(path, hidden)
    except OSError:
        os.chmod(path, 0o660)
        raise
    return hidden


def _show(hidden: str, path: str) -> None:
    """Open the door _hide closed: the socket file back at path (never over another one
    that appeared there meanwhile), mode 0660."""
    os.link(hidden, path)
    os.chmod(path, 0o660)
    os.unlink(hidden)
    _remove_hiding_place(hidden)


def _hiding_prefix(path: str) -> str:
    """The name of _hide's directories (mode 0700) start so, beside the socket file."""
    return f".{os.path.basename(path)}.paused-"


def _remove_hiding_places(path: str) -> None:
    """Remove what a run that ended while not listening left of _hide's (no firewalld
    listens at path now: _prepare_path said so)."""
    parent, prefix = os.path.dirname(path), _hiding_prefix(path)
    for name in os.listdir(parent):
        place = os.path.join(parent, name)
        if not name.startswith(prefix) or not os.path.isdir(place):
            continue
        hidden = os.path.join(place, os.path.basename(path))
        try:
            if stat.S_ISSOCK(os.lstat(hidden).st_mode):
                os.unlink(hidden)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", hidden, exc)
        _remove_hiding_place(hidden)


def _remove_hiding_place(hidden: str) -> None:
    try:
        os.rmdir(os.path.dirname(hidden))
    except OSError as exc:
        log.warning("cannot remove %s: %s", os.path.dirname(hidden), exc)


def _remove_socket_file(path: str, inode: int) -> None:
    """Remove the socket file at path if it is still the one we made."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def _prepare_path(path: str) -> None:
    """Create the socket's directory if needed; remove a stale socket file, not a live one."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o755)
        # Everyone may look inside; the socket file's own mode and group guard it.
        os.chmod(parent, 0o755)  # noqa: S103  (makedirs' mode is filtered by the umask)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket; remove it or pick another --socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:  # nobody listens: left by a crashed run
            os.unlink(path)
            return
        except OSError as exc:
            raise StartupError(f"cannot check {path}: {exc}") from None
    raise StartupError(f"another shuttle-firewalld is listening on {path}")

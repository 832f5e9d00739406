"""The control sockets of a running client: a ROUTER that answers scripts' requests and an
XPUB that publishes events, side by side on ipc; and a ZAP handler that admits our own uid
only, by the kernel's credentials of each connection (the directory is private as well, but
file modes are easy to get wrong, and /tmp is shared).

The sockets live in a zmq context of their own: libzmq asks the ZAP handler of a socket's
context, and the firewalld connection must not be judged by this one's rule.
"""

import asyncio
import errno
import fcntl
import logging
import os
import socket
import stat
from typing import Any, Awaitable, Callable, List, Optional, Set, Tuple

import zmq
import zmq.asyncio
from shuttle_protocol.control_messages import PAIRS
from shuttle_protocol.errors import LocalProtocolError, RemoteProtocolError
from shuttle_protocol.frames import MAX_FRAME, decode_frame, encode_frame
from shuttle_protocol.schema import Message
from shuttle_protocol.zap import ZAP_ENDPOINT, Peer, zap_reply

from .control_paths import events_path

log = logging.getLogger("shuttle")

DOMAIN = b"shuttle-control"
MAX_BUSY = 16  # requests being handled at once; more are refused, not queued without bound
CLOSE_LINGER_MS = 500  # an answer to StopRequest still goes out while the client closes
LOCK_ATTEMPTS = 3  # to lock path.lock, each one after its holder removed it as it ended

Handler = Callable[[Message], Awaitable[Message]]


class ControlSetupError(Exception):
    """The control sockets cannot be set up; the text is for the user."""


class ControlInUse(ControlSetupError):
    """Another live client listens on the path."""


class RequestRefused(Exception):
    """A handler's refusal; the text goes back to the caller as ControlError."""


def own_uid_only(peer: Peer) -> Optional[str]:
    """ZAP: the client's own uid may connect, nobody else (root neither)."""
    if peer.uid == os.getuid():
        return None
    return f"uid {peer.uid} may not control uid {os.getuid()}'s shuttle-client"


class ControlServer:
    """The request and event sockets at path and path.events, from start() to close()."""

    def __init__(self, path: str, handle: Handler) -> None:
        self.path = path
        self.events_path = events_path(path)
        self._handle = handle
        self._context: Optional[zmq.asyncio.Context] = None
        self._router: Optional[zmq.asyncio.Socket] = None
        self._xpub: Optional[zmq.Socket[bytes]] = None  # a plain shadow: publish() never waits
        self._bound: List[Tuple[str, int]] = []  # the socket files we made: (path, inode)
        self._lock: Optional[int] = None  # the descriptor holding path.lock, from start()
        self._tasks: Set[asyncio.Task[Any]] = set()
        self._busy = 0
        self._topics: Set[bytes] = set()  # what subscribers subscribed to; empty: no one
        self._sequence = 0

    def move(self, path: str) -> None:
        """Listen at path instead (before start)."""
        self.path = path
        self.events_path = events_path(path)

    async def start(self) -> None:
        """Bind both sockets; ControlInUse if another client has them, ControlSetupError if
        the directory is not ours."""
        _private_directory(os.path.dirname(self.path))
        self._lock = _lock(self.path)
        try:
            for path in (self.path, self.events_path):
                _claim(path)
        except ControlSetupError:
            self.close()
            raise
        context = self._context = zmq.asyncio.Context()
        zap = context.socket(zmq.REP)
        zap.linger = 0
        zap.bind(ZAP_ENDPOINT)
        self._spawn(self._serve_zap(zap))
        router = self._router = context.socket(zmq.ROUTER)
        xpub = context.socket(zmq.XPUB)
        for sock in (router, xpub):
            sock.linger = CLOSE_LINGER_MS
            sock.zap_domain = DOMAIN  # so that libzmq asks ZAP even with the NULL mechanism
            sock.maxmsgsize = MAX_FRAME
        old_umask = os.umask(0o077)
        try:
            for sock, path in ((router, self.path), (xpub, self.events_path)):
                sock.bind("ipc://" + path)
                self._bound.append((path, os.stat(path).st_ino))
        except (zmq.ZMQError, OSError) as exc:
            self.close()
            raise ControlSetupError(f"cannot listen on {self.path}: {exc}") from None
        finally:
            os.umask(old_umask)
        # The asyncio socket's send returns a future; a plain one on the same libzmq socket
        # drops an event at once when a subscriber's queue is full, which is what we want.
        self._xpub = zmq.Socket.shadow(xpub.underlying)
        self._spawn(self._serve_requests(router))
        self._spawn(self._watch_subscriptions(xpub))

    def publish(self, event: Message) -> None:
        """Send an event to the subscribers, if there are any (else it costs nothing)."""
        if not self._topics or self._xpub is None:
            return
        self._sequence += 1
        try:
            # A PUB socket drops what a slow subscriber's queue cannot take: the sequence
            # number's gap tells the subscriber.
            self._xpub.send(encode_frame(self._sequence, event), zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("event not published: %s", exc)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._context is not None:
            # Closes every socket first (term() alone would wait for them for ever).
            self._context.destroy(linger=CLOSE_LINGER_MS)
            self._context = None
            self._router = self._xpub = None
        # Only the files we made, and only if they are still those: after a failed start,
        # the path may be another client's socket, or not a socket at all.
        bound, self._bound = self._bound, []
        for path, inode in bound:
            try:
                if os.lstat(path).st_ino == inode:
                    os.unlink(path)
            except OSError:
                pass
        if self._lock is not None:
            # Unlinked while still held: a client that opened it meanwhile locks a file that
            # is no longer at the path, sees so and tries again (_lock).
            try:
                if os.lstat(lock_path(self.path)).st_ino == os.fstat(self._lock).st_ino:
                    os.unlink(lock_path(self.path))
            except OSError:
                pass
            os.close(self._lock)
            self._lock = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_zap(self, zap: zmq.asyncio.Socket) -> None:
        while True:
            frames = await zap.recv_multipart()
            reply = zap_reply(frames, DOMAIN, own_uid_only)
            if reply[2] != b"200":
                log.warning("control socket: refused a connection: %s", reply[3].decode())
            await zap.send_multipart(reply)

    async def _watch_subscriptions(self, xpub: zmq.asyncio.Socket) -> None:
        while True:
            frame = await xpub.recv()
            # XPUB hands us b"\x01" + topic on the first subscription to a topic, and
            # b"\x00" + topic when the last subscriber to it leaves (or unsubscribes).
            if frame[:1] == b"\x01":
                self._topics.add(frame[1:])
            elif frame[:1] == b"\x00":
                self._topics.discard(frame[1:])

    async def _serve_requests(self, router: zmq.asyncio.Socket) -> None:
        while True:
            frames = await router.recv_multipart(copy=False)
            identity = frames[0].bytes
            if len(frames) != 2:
                reply = PAIRS.refuse_frame(None, f"a request is one frame, not {len(frames) - 1}")
            elif self._busy >= MAX_BUSY:
                reply = PAIRS.refuse_frame(frames[1].buffer, f"busy: {MAX_BUSY} requests at once")
            else:
                self._busy += 1  # now: the task may not run before the next request is read
                self._spawn(self._answer(router, identity, frames[1].bytes))
                continue
            await router.send_multipart([identity, reply])

    async def _answer(self, router: zmq.asyncio.Socket, identity: bytes, payload: bytes) -> None:
        try:
            reply = await self._reply(payload)
        finally:
            self._busy -= 1
        try:
            await router.send_multipart([identity, reply], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the caller went away, or its queue is full
            log.debug("control answer not sent: %s", exc)

    async def _reply(self, payload: bytes) -> bytes:
        try:
            request_id, request = decode_frame(payload)
        except RemoteProtocolError as exc:
            log.info("control socket: bad request: %s", exc)
            return PAIRS.refuse_frame(payload, f"bad request: {exc}")
        try:
            return PAIRS.reply(request_id, request, await self._handle(request))
        except RequestRefused as exc:
            return PAIRS.refuse(request_id, str(exc))
        except LocalProtocolError as exc:  # an answer too big, a value out of range, a bug
            log.exception("control socket: cannot answer %s", type(request).__name__)
            return PAIRS.refuse(request_id, f"internal error: {exc}")


def _private_directory(path: str) -> None:
    """Make path (mode 0700) if it is missing; refuse one that is not ours alone."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError as exc:
        raise ControlSetupError(
            f"cannot make the control directory {path}: {exc.strerror}"
        ) from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ControlSetupError(f"{path} is not a directory of ours: choose another with --control")
    if info.st_mode & 0o022:
        raise ControlSetupError(
            f"{path} is writable by others: another user could replace the control socket "
            "(chmod go-w it, or choose another with --control)"
        )


def lock_path(path: str) -> str:
    """The lock file beside a control socket."""
    return path + ".lock"


def _lock(path: str) -> int:
    """Lock path.lock for as long as this client runs (the descriptor that holds it), or
    ControlInUse if another client holds it.

    A client holds the lock from before it looks at the socket files until after it has
    removed them. Without it, a client that found the socket of another one starting beside
    it, bound but not yet listening (in libzmq, between bind and listen), took it for a dead
    client's and removed it: the other then listened where nobody could connect.
    """
    name = lock_path(path)
    for _ in range(LOCK_ATTEMPTS):
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ControlSetupError(f"cannot use {name}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if isinstance(exc, BlockingIOError):
                raise ControlInUse(
                    f"another shuttle-client listens on {path}: give this one another --control"
                ) from None
            raise ControlSetupError(f"cannot lock {name}: {exc.strerror}") from None
        try:
            if os.lstat(name).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:  # its holder removed it as we locked it
            pass
        os.close(fd)  # locked a file that its holder removed as it ended: once more
    raise ControlSetupError(f"cannot lock {name}: it keeps being replaced")


def _claim(path: str) -> None:
    """Remove a socket file left by a client that is gone; refuse one a live client has.

    zmq's ipc bind would silently take the path over from a running client. Called with
    the path's lock held (_lock), so a socket nobody listens on is a dead client's.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlSetupError(f"cannot use {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlSetupError(f"{path} exists and is not a socket: choose --control")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno != errno.ECONNREFUSED:
            raise ControlSetupError(f"cannot use {path}: {exc.strerror}") from None
        os.unlink(path)  # nobody listens: a client that died left it
        return
    finally:
        probe.close()
    raise ControlInUse(f"another shuttle-client listens on {path}: give this one another --control")

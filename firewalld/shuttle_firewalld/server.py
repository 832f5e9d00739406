"""The daemon's loop: the ROUTER socket for requests, our ZAP handler, and lease expiry.

One thread and one zmq.Poller. Whatever bytes arrive, each gets an answer and the loop goes
on; only a signal ends it.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Callable

import zmq
from shuttle_protocol.errors import RemoteProtocolError
from shuttle_protocol.firewall_messages import ErrorAnswer
from shuttle_protocol.frames import MAX_FRAME, MAX_ITEMS, MAX_REQUEST_ID, decode_frame, encode_frame
from shuttle_protocol.stream import new_unpacker, unpack_errors

from . import requests
from .errors import RequestError, StartupError
from .sessions import Sessions
from .zap import DOMAIN, ZAP_ENDPOINT, zap_reply

log = logging.getLogger(__name__)

POLL_MS = 500  # the longest a signal or a run-out lease waits for the loop's attention
BATCH = 100  # messages taken from one socket per turn, so expiry and signals get turns too
MAX_ERROR_TEXT = 2000  # ErrorAnswer's own limit


def answer(sessions: Sessions, uid: int, payload: bytes) -> bytes:
    """The answer frame to one request frame from uid. Never raises."""
    try:
        request_id, request = decode_frame(payload)
    except RemoteProtocolError as exc:
        log.info("bad request from uid %d: %s", uid, exc)
        return error_frame(request_id_of(payload), f"bad request: {exc}")
    try:
        return encode_frame(request_id, requests.handle(sessions, uid, request))
    except RequestError as exc:
        log.info("refused %s from uid %d: %s", type(request).__name__, uid, exc)
        return error_frame(request_id, str(exc))
    except Exception as exc:  # our bug: keep serving, and say so in the log with a traceback
        log.exception("internal error on %s from uid %d", type(request).__name__, uid)
        return error_frame(request_id, f"internal error: {type(exc).__name__}: {exc}")


def error_frame(request_id: int, text: str) -> bytes:
    return encode_frame(request_id, ErrorAnswer(text[:MAX_ERROR_TEXT]))


def request_id_of(payload: bytes) -> int:
    """The request id of a frame that failed to decode, so the caller can match the error.

    0 when the frame does not even start as [request id, ...].
    """
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


def caller_uid(frame: zmq.Frame) -> int | None:
    """The uid our ZAP handler gave this connection (from the kernel), or None."""
    try:
        return int(frame.get("User-Id"))
    except (zmq.ZMQError, ValueError):
        return None


class Server:
    """The listening socket file and the zmq sockets behind it, from bind to removal."""

    def __init__(self, path: str, gid: int, sessions: Sessions) -> None:
        self.path = path
        self._sessions = sessions
        _prepare_path(path)
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
        # The socket file appears at bind; the umask keeps it private until chmod below.
        old_umask = os.umask(0o077)
        try:
            self._router.bind("ipc://" + path)
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise StartupError(f"cannot listen on ipc://{path}: {exc}") from None
        finally:
            os.umask(old_umask)
        self._inode = os.stat(path).st_ino
        try:
            os.chown(path, 0, gid)
            os.chmod(path, 0o660)
        except OSError:
            self.close()
            raise

    def run(self, stopping: Callable[[], bool]) -> None:
        """Serve until stopping() is true; close expired sessions on the way."""
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._router, zmq.POLLIN)
        while not stopping():
            ready = dict(poller.poll(POLL_MS))
            if self._zap in ready:
                self._serve_zap()
            if self._router in ready:
                self._serve_requests()
            self._sessions.expire()

    def close(self) -> None:
        """Close the sockets and remove the socket file, if it is still ours."""
        self._close_sockets()
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError as exc:
            log.warning("cannot remove %s: %s", self.path, exc)

    def _close_sockets(self) -> None:
        self._router.close()
        self._zap.close()
        self._context.term()

    def _serve_zap(self) -> None:
        for _ in range(BATCH):
            try:
                frames = self._zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            reply = zap_reply(frames)
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
            uid = caller_uid(frames[-1])
            if len(frames) != 2:
                log.info("bad request from uid %s: %d frames", uid, len(frames) - 1)
                reply = error_frame(0, f"a request is one frame, not {len(frames) - 1}")
            elif uid is None:
                log.warning("a request without the caller's uid")  # ZAP runs for everyone
                reply = error_frame(0, "who are you? no peer credentials")
            else:
                reply = answer(self._sessions, uid, frames[1].bytes)
            try:
                # A ROUTER drops what it cannot deliver (peer gone, queue full): never blocks.
                self._router.send_multipart([identity, reply], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.debug("answer to uid %s not sent: %s", uid, exc)


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

"""The connections to the zmq socket, counted per uid from libzmq's socket monitor; those over
the caps are ended at once, before they hold a descriptor and a receive buffer for long, and
are not counted: one member's refused connections take no room from another member's.

libzmq accepts every connection itself and, out of descriptors, aborts in its ipc listener
(an EMFILE assertion): so the count must stay well below the open file limit, whoever
connects, whether or not it ever completes its handshake. The monitor names each accepted
connection by its descriptor; the kernel names its peer (SO_PEERCRED); ending it is a
shutdown() on our own duplicate, after which libzmq sees the end and closes its descriptor
itself (closing it under libzmq's feet would be a bug of ours).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections import Counter

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

MAX_CONNECTIONS_PER_UID = 8  # a client holds one per session; ctl one more while it asks
MAX_CONNECTIONS = 256  # in all; main.py scales it down to the open file limit
UNKNOWN = -1  # the peer of a connection gone before we could ask the kernel
UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
BATCH = 10  # events taken per call of serve(): the server looks at its descriptors between


class Connections:
    """The monitor of one zmq socket listening at path, and the count it keeps."""

    def __init__(self, router: zmq.Socket[bytes], path: str, limit: int = MAX_CONNECTIONS) -> None:
        """Before router binds, so that no connection goes uncounted."""
        self.limit = limit
        self._router = router
        self._path = path
        self.monitor = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._uid_of: dict[int, int] = {}  # by libzmq's descriptor of the connection
        self._per_uid: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self._uid_of)

    def of(self, uid: int) -> int:
        """How many connections uid has now."""
        return self._per_uid[uid]

    def serve(self) -> bool:
        """Take up to BATCH of the monitor's events: count, and end what is over a cap.
        Whether there may be more."""
        for _ in range(BATCH):
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return False
            fd = event["value"]
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._forget(fd)  # a descriptor reused before we read its disconnection
                self._accepted(fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._forget(fd)
        return True

    def close(self) -> None:
        self._router.disable_monitor()
        self.monitor.close()

    def _forget(self, fd: int) -> None:
        uid = self._uid_of.pop(fd, None)
        if uid is not None:
            self._per_uid[uid] -= 1
            if self._per_uid[uid] <= 0:
                del self._per_uid[uid]

    def _accepted(self, fd: int) -> None:
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:  # gone already, or no descriptor left for a duplicate: counted only
            self._count(fd, UNKNOWN)
            return
        with sock:
            uid = self._peer(sock)
            too_many = ""
            if uid not in (0, UNKNOWN) and self._per_uid[uid] >= MAX_CONNECTIONS_PER_UID:
                too_many = f"uid {uid} has {MAX_CONNECTIONS_PER_UID} connections already"
            elif len(self._uid_of) >= self.limit and uid != UNKNOWN:
                too_many = f"{self.limit} connections are open, the most this firewalld takes"
            if not too_many:
                self._count(fd, uid)
                return
            # Not counted: it ends now, and must not crowd others out of the total meanwhile.
            log.warning("refused a connection of uid %d: %s", uid, too_many)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # it ended meanwhile
                pass

    def _peer(self, sock: socket.socket) -> int:
        """The uid at the other end, if sock is a connection to our socket file (libzmq's
        descriptor may have been closed and reused meanwhile: then UNKNOWN)."""
        try:
            if sock.family != socket.AF_UNIX or sock.getsockname() != self._path:
                return UNKNOWN
            _pid, uid, _gid = UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
            )
        except OSError:
            return UNKNOWN
        return int(uid)

    def _count(self, fd: int, uid: int) -> None:
        self._uid_of[fd] = uid
        self._per_uid[uid] += 1

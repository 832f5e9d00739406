"""The processes that opened sessions, each watched through a pidfd, so that a session ends
the moment its client's process does, not a lease later.

A dead client frees its listener's port: anyone could bind it and receive the connections
that the session's rules still redirect there, until the lease ran out (up to an hour). A
pidfd (pidfd_open) names one process and never another, even once its pid is reused, and it
turns readable when that process exits. The pidfds sit in one epoll set, whose descriptor
the daemon's loop polls beside its zmq sockets: one descriptor there, however many sessions.
One pidfd per session, so the per-uid and total session caps bound them.
"""

from __future__ import annotations

import contextlib
import os
import select

STATUS_BYTES = 4096  # /proc/PID/status's Uid line is near its start; we read no more


class ProcessGone(Exception):
    """The process to watch has exited, or is not the caller's."""


class Exits:
    """Watched processes by key (a session id), and which of them have exited."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._pidfds: dict[str, int] = {}  # key → pidfd
        self._keys: dict[int, str] = {}  # pidfd → key

    def fileno(self) -> int:
        """Readable while a watched process has exited and its key is not forgotten."""
        return self._epoll.fileno()

    def __len__(self) -> int:
        return len(self._pidfds)

    def watch(self, key: str, pid: int, uid: int) -> None:
        """Watch process pid, which must be alive and run as uid (the caller's, as the
        kernel gave it); ProcessGone if not.

        The pid comes from the connection's peer credentials, taken when it connected. If
        that process has exited since, its pid may be another process's now: the uid check,
        made while the pidfd shows its process alive, keeps such a process of another user
        from being taken for the caller's.
        """
        if key in self._pidfds:
            raise ValueError(f"{key} is watched already")
        if pid <= 0:  # SO_PEERCRED's pid of a process that our pid namespace cannot see
            raise ProcessGone("the calling process is in another pid namespace: not watchable")
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise ProcessGone(f"the calling process (pid {pid}) has exited") from None
        try:
            owner = _uid_of(pid)
            if has_exited(pidfd) or owner is None:  # so /proc/PID was another process, or none
                raise ProcessGone(f"the calling process (pid {pid}) has exited")
            if owner != uid:
                raise ProcessGone(f"pid {pid} is not a process of uid {uid}")
            self._epoll.register(pidfd, select.EPOLLIN)
        except BaseException:
            os.close(pidfd)
            raise
        self._pidfds[key], self._keys[pidfd] = pidfd, key

    def forget(self, key: str) -> None:
        """Stop watching key's process, if it is watched; never raises."""
        pidfd = self._pidfds.pop(key, None)
        if pidfd is None:
            return
        del self._keys[pidfd]
        with contextlib.suppress(OSError):
            self._epoll.unregister(pidfd)
        with contextlib.suppress(OSError):
            os.close(pidfd)

    def exited(self) -> list[str]:
        """The keys whose process has exited (still watched until forgotten). Never waits."""
        return [self._keys[fd] for fd, _ in self._epoll.poll(0) if fd in self._keys]


def has_exited(pidfd: int) -> bool:
    """Whether the pidfd's process has exited (a pidfd is readable from then on)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _uid_of(pid: int) -> int | None:
    """The effective uid of process pid, from /proc/PID/status; None if it has gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            text = status.read(STATUS_BYTES).decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        name, _, values = line.partition(":")
        if name == "Uid":
            fields = values.split()  # real, effective, saved, filesystem
            if len(fields) == 4 and fields[1].isdigit():
                return int(fields[1])
    return None

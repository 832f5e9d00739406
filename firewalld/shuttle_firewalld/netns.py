"""The network namespace each session's rules go in: its caller's.

A firewall tool, a sock_diag query and a socket act in the network namespace of the thread
that runs or makes them. A caller in another network namespace (`ip netns exec`,
`shuttle-client --namespace`, `unshare -rn`) reaches firewalld's socket all the same (a path
in the file system), and its rules belong in its own namespace, not in firewalld's. So every
method call of such a session runs in a thread of firewalld that entered that namespace
(setns): the worker's (the port check, applying, updating and removing its rules) in one,
the loop's (tproxy's reply sockets and the look at their flows) in another, so that the loop
never waits behind a long apply; two threads per namespace while sessions live there, so the
session caps bound them. The threads hold the namespace open: it outlives a deleted name or
the exit of its last process, until the sessions there are removed. Sessions of firewalld's
own namespace run where they are called, as before.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from shuttle_local.netns import MAP_BYTES, OWN, Identity, enter, identity, identity_of, mapped
from shuttle_protocol.firewall_messages import ANY_OWNER

from .errors import RequestError
from .exits import has_exited

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

NS_GET_USERNS = 0xB701  # linux/nsfs.h, _IO(0xb7, 0x1): the user namespace owning a namespace
OWN_USERS = "/proc/self/ns/user"


class Netns:
    """Where one namespace's sessions run their method calls, and the uids their rules name
    there. HOME, firewalld's own, runs them in the calling thread."""

    def __init__(
        self,
        key: Identity | None = None,
        fd: int = -1,
        maps: tuple[str, str] | None = None,
    ) -> None:
        """key, fd: the namespace and an open file of it (None, -1: firewalld's own); maps:
        the uid_map and gid_map of the user namespace owning it, when that is not
        firewalld's (None: ids are the same there as here)."""
        self.key = key
        self._fd = fd
        self._maps = maps
        self._threads: list[ThreadPoolExecutor] = []  # the worker's, the loop's
        if key is not None:
            try:
                for _ in range(2):
                    thread = ThreadPoolExecutor(1, thread_name_prefix="shuttle-netns")
                    self._threads.append(thread)
                    # The executor's one thread, made by this first call, enters the
                    # namespace and stays there: every later call runs on it.
                    thread.submit(enter, fd).result()
            except (OSError, RuntimeError) as exc:  # RuntimeError: no thread to be had
                self.close()
                why = exc.strerror if isinstance(exc, OSError) else exc
                raise RequestError(
                    f"cannot enter the network namespace of the calling process: {why}"
                ) from None

    def __str__(self) -> str:
        return "firewalld's" if self.key is None else f"net:[{self.key[1]}]"

    def run(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """call(*args, **kwargs) in this namespace, for the worker; what it returns or
        raises."""
        return self._in(0, call, *args, **kwargs)

    def quick(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """As run(), for the loop: on a thread of its own, never behind the worker's calls."""
        return self._in(1, call, *args, **kwargs)

    def _in(self, which: int, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if not self._threads:
            return call(*args, **kwargs)
        return self._threads[which].submit(call, *args, **kwargs).result()

    def uid(self, uid: int) -> int:
        """uid (a uid here, or ANY_OWNER) as rules in this namespace must name it: the
        kernel's owner matches read ids in the user namespace owning the network namespace.
        KeyError if it has none there."""
        return self._inside(uid, 0)

    def gid(self, gid: int) -> int:
        """As uid(), for a gid."""
        return self._inside(gid, 1)

    def _inside(self, outer: int, which: int) -> int:
        if self._maps is None or outer == ANY_OWNER:
            return outer
        inside = mapped(self._maps[which], outer)
        if inside is None:
            raise KeyError(outer)
        return inside

    def close(self) -> None:
        for thread in self._threads:
            thread.shutdown()
        self._threads = []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


HOME = Netns()


class Namespaces:
    """The namespaces that sessions live in, each with its thread, by how many sessions."""

    def __init__(self) -> None:
        self._own = identity_of(OWN)
        self._own_users = identity_of(OWN_USERS)
        self._lock = threading.Lock()  # the worker opens and removes; a shutdown removes too
        self._open: dict[Identity, Netns] = {}
        self._users: Counter[Identity] = Counter()

    def __len__(self) -> int:
        return len(self._open)

    def of(self, pid: int | None, uid: int, gid: int) -> Netns:
        """The namespace of process pid (None: firewalld's own), for a session capturing
        uid's and gid's traffic; release() it with the session. RequestError if the process
        has gone, its namespace cannot be entered, or uid or gid have no id there."""
        if pid is None or pid <= 0:  # pid <= 0: Exits.watch refuses the caller
            return HOME
        fd, users, found = _namespace_of(pid)
        maps: tuple[str, str] | None = found
        key = identity(fd)
        if key == self._own:
            os.close(fd)
            return HOME
        try:
            owner = _owner(fd)
            if owner == self._own_users:
                maps = None
            elif owner != users:
                raise RequestError(
                    "the calling process's network namespace belongs to a user namespace it is "
                    "not in: firewalld cannot tell which uid its traffic has there"
                )
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            netns = self._open.get(key)
            if netns is not None:
                os.close(fd)
            else:
                netns = Netns(key, fd, maps)
                self._open[key] = netns
                log.info("sessions in network namespace %s from now on", netns)
            self._users[key] += 1
        try:
            netns.uid(uid)
            netns.gid(gid)
        except KeyError as exc:
            self.release(netns)
            raise RequestError(
                f"id {exc.args[0]} has none in the user namespace that owns the calling "
                "process's network namespace"
            ) from None
        return netns

    def release(self, netns: Netns) -> None:
        """One session fewer in netns; its thread ends with the last. Never raises."""
        if netns.key is None:
            return
        with self._lock:
            self._users[netns.key] -= 1
            if self._users[netns.key] > 0:
                return
            del self._users[netns.key]
            self._open.pop(netns.key, None)
        try:
            netns.close()
        except Exception:  # only a thread and a descriptor: what matters has happened
            log.exception("closing network namespace %s failed", netns)
        log.info("no session in network namespace %s any more", netns)


def _namespace_of(pid: int) -> tuple[int, Identity, tuple[str, str]]:
    """An open file of process pid's network namespace, the identity of its user namespace,
    and that one's uid_map and gid_map: read while a pidfd shows the process alive, so they
    are its, not those of a process that took its pid since. RequestError if not."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise RequestError(f"the calling process (pid {pid}) has exited") from None
    try:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            users = identity_of(f"/proc/{pid}/ns/user")
            maps = _read(f"/proc/{pid}/uid_map"), _read(f"/proc/{pid}/gid_map")
            if has_exited(pidfd):
                raise RequestError(f"the calling process (pid {pid}) has exited")
        except BaseException:
            os.close(fd)
            raise
    except OSError as exc:
        raise RequestError(
            f"cannot see the network namespace of the calling process (pid {pid}): {exc.strerror}"
        ) from None
    finally:
        os.close(pidfd)
    return fd, users, maps


def _owner(fd: int) -> Identity:
    """The user namespace that owns the namespace of fd."""
    try:
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
    except OSError as exc:
        raise RequestError(
            f"cannot tell which user namespace owns the calling process's network namespace: "
            f"{exc.strerror}"
        ) from None
    try:
        return identity(owner)
    finally:
        os.close(owner)


def _read(path: str) -> str:
    with open(path, "rb") as file:
        return file.read(MAP_BYTES).decode("ascii", "replace")

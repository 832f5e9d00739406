"""Network namespaces, as both local programs use them: which one a file names, and entering
one (setns, which Python's os module has only from 3.12). The client enters the one of
`--namespace NAME`; firewalld runs each session's work in its caller's."""

from __future__ import annotations

import ctypes
import os
import pwd
from typing import Optional, Tuple

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"  # where `ip netns add NAME` mounts its namespaces
OWN = "/proc/self/ns/net"
MAP_BYTES = 16384  # of a uid_map or gid_map: at most 340 lines of three ids each

Identity = Tuple[int, int]  # (device, inode) of a namespace file: equal for one namespace


def identity(fd: int) -> Identity:
    """Which namespace the open namespace file fd is."""
    status = os.fstat(fd)
    return status.st_dev, status.st_ino


def identity_of(path: str) -> Identity:
    """Which namespace the file at path is (OSError if it cannot be read)."""
    status = os.stat(path)
    return status.st_dev, status.st_ino


def mapped(map_text: str, value: int, outward: bool = False) -> Optional[int]:
    """value through a uid_map or gid_map (lines of "inside outside count"): an id outside
    to the one inside, or with outward the other way; None if the map has none for it."""
    for line in map_text.splitlines():
        fields = line.split()
        if len(fields) == 3 and all(field.isdigit() for field in fields):
            inside, outside, count = map(int, fields)
            start, end = (inside, outside) if outward else (outside, inside)
            if start <= value < start + count:
                return end + value - start
    return None


def outer_uid() -> int:
    """Our uid outside the user namespace we may be in, as firewalld sees callers (in one
    that `unshare -r` made, we are 0 in there); our uid if no map says otherwise."""
    uid = os.getuid()
    try:
        with open("/proc/self/uid_map", "rb") as file:
            text = file.read(MAP_BYTES).decode("ascii", "replace")
    except OSError:
        return uid
    found = mapped(text, uid, outward=True)
    return uid if found is None else found


def enter(fd: int) -> None:
    """Move the calling thread into the network namespace of the open file fd (a thread
    alone: its process's other threads stay where they are); OSError if the kernel refuses
    (EPERM without CAP_SYS_ADMIN over it, EINVAL if fd is no network namespace)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def enter_named(name: str, program: str) -> None:
    """Run from now on in the network namespace `ip netns` calls name, before any thread or
    socket exists (sshuttle's --namespace does the same). Root enters it; another user can
    only be in it already. ValueError with one line for the user if neither."""
    path = os.path.join(NETNS_DIR, name)
    try:
        wanted = identity_of(path)
    except OSError as exc:
        raise ValueError(
            f"no network namespace {name!r} ({path}: {exc.strerror}); `ip netns list` "
            "shows those there are"
        ) from None
    if identity_of(OWN) == wanted:
        return
    if os.geteuid() != 0:
        raise ValueError(
            f"--namespace {name}: only root can enter a network namespace; start the client "
            f"in it instead: sudo ip netns exec {name} sudo -u {_user()} {program} ..."
        )
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter(fd)
    except OSError as exc:
        raise ValueError(f"--namespace {name}: cannot enter it: {exc.strerror}") from None
    finally:
        os.close(fd)


def _user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())

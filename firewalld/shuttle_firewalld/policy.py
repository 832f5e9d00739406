"""Scope policy: whose traffic a caller may capture, whether forwarded traffic too, and
whether it may write host names into the hosts file.

By right, a caller captures its own uid's traffic (narrowed to a gid if it likes). More needs
root or a line in the policy file. `missing` is the whole decision, one pure function; the
file format is documented in docs/firewalld.md and parsed by `load_policy`.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Callable, Collection
from dataclasses import dataclass

from shuttle_protocol.checks import check_hostname
from shuttle_protocol.errors import LocalProtocolError

from .errors import StartupError

DEFAULT_PATH = "/etc/shuttle/firewalld.policy"
CAPTURE_OTHERS = "capture-others"  # a session for another uid, or for every uid
FORWARD = "forward"  # also capture traffic routed through this host
HOSTS = "hosts"  # write host names into the hosts file, which every user's lookups read
PERMISSIONS = (CAPTURE_OTHERS, FORWARD, HOSTS)
WHAT = {
    CAPTURE_OTHERS: "capturing other users' traffic",
    FORWARD: "capturing forwarded traffic",
    HOSTS: "writing host names into the hosts file",
}
LINE_FORMAT = "a line is: allow USER|@GROUP PERMISSION..."
# `hosts=corp.example,lab.example`: hosts, for names in (or under) these domains only.
HOSTS_WITHIN = HOSTS + "="
MAX_FILE = 1024 * 1024  # a policy file is a few lines; anything this big is a mistake

# What a caller may do with no policy at all: its own traffic. The decision, as a table:
#
#   caller    uid asked        forward   needs
#   root      anything         any       nothing
#   U         U                false     nothing (any gid: it only narrows)
#   U         another, or -1   false     capture-others
#   U         U                true      forward
#   U         another, or -1   true      capture-others and forward
#
# and, for setting host names in the hosts file (SetHostsRequest): root needs nothing, any
# other caller `hosts`, whatever its session captures; `hosts=DOMAIN,...` grants it for
# names in those domains only (suffixes()).


def missing(
    caller: int, uid: int, forward: bool, granted: Collection[str], hosts: bool = False
) -> tuple[str, ...]:
    """The permissions this request needs that the caller lacks; () means allowed.

    uid and forward: what a session asks to capture; hosts: the request writes host names.
    """
    if caller == 0:
        return ()
    needed = []
    if uid != caller:
        needed.append(CAPTURE_OTHERS)
    if forward:
        needed.append(FORWARD)
    if hosts:
        needed.append(HOSTS)
    return tuple(permission for permission in needed if permission not in granted)


def refusal(lacking: Collection[str], path: str) -> str:
    """The caller's error text for what missing() found: what is needed, and where."""
    return "; ".join(
        f"{WHAT[permission]} needs root or a policy entry in {path} "
        f"(allow USER|@GROUP {permission})"
        for permission in lacking
    )


@dataclass(frozen=True)
class Entry:
    """One `allow` line: a user (uid) or a group's members (gid), and what they may do."""

    uid: int | None
    gid: int | None
    permissions: frozenset[str]
    # With `hosts=...`: the only domains its host names may be in (lower case); None: any.
    domains: frozenset[bytes] | None = None


def _groups_of(uid: int) -> set[int]:
    """The groups of uid as the user and group databases say (as sudo and login see them)."""
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return set()
    return set(os.getgrouplist(user.pw_name, user.pw_gid))


@dataclass(frozen=True)
class Policy:
    """The policy file's entries; without a file, nobody gets anything beyond their own."""

    path: str
    entries: tuple[Entry, ...] = ()
    groups_of: Callable[[int], set[int]] = _groups_of

    def _entries_of(self, uid: int) -> list[Entry]:
        """The entries that apply to uid, directly or through its groups."""
        found = []
        groups: set[int] | None = None  # looked up only if a group entry needs it
        for entry in self.entries:
            if entry.uid is not None and entry.uid == uid:
                found.append(entry)
            elif entry.gid is not None:
                if groups is None:
                    groups = self.groups_of(uid)
                if entry.gid in groups:
                    found.append(entry)
        return found

    def granted(self, uid: int) -> frozenset[str]:
        """Everything the entries give uid, directly or through its groups."""
        return frozenset().union(*(entry.permissions for entry in self._entries_of(uid)))

    def domains(self, uid: int) -> frozenset[bytes] | None:
        """The domains uid's host names must be in (lower case), None for any: what its
        `hosts=...` entries list together, unless one entry grants `hosts` plainly (or uid
        is root). Only asked once check_hosts() has let uid set names at all."""
        if uid == 0:
            return None
        found: set[bytes] = set()
        for entry in self._entries_of(uid):
            if HOSTS in entry.permissions:
                if entry.domains is None:
                    return None
                found |= entry.domains
        return frozenset(found)

    def check(self, caller: int, uid: int, forward: bool) -> str | None:
        """The refusal text for this request, or None if the caller may make it."""
        lacking = missing(caller, uid, forward, self.granted(caller) if caller != 0 else ())
        return refusal(lacking, self.path) if lacking else None

    def check_hosts(self, caller: int) -> str | None:
        """The refusal text for writing host names, or None if the caller may."""
        granted = self.granted(caller) if caller != 0 else ()
        lacking = missing(caller, caller, False, granted, hosts=True)
        return refusal(lacking, self.path) if lacking else None


class PolicyError(StartupError):
    """The policy file is unusable; str() is one line naming the file, the line and why."""


def parse_line(words: list[str]) -> Entry:
    """One non-empty line, split into words; ValueError says what is wrong with it."""
    if words[0] != "allow":
        raise ValueError(f"unknown keyword {words[0]!r:.40} ({LINE_FORMAT})")
    if len(words) < 3:
        raise ValueError(f"incomplete line ({LINE_FORMAT})")
    subject, words = words[1], words[2:]
    permissions: set[str] = set()
    domains: set[bytes] | None = None
    for word in words:
        permission = word
        if word.startswith(HOSTS_WITHIN):
            domains = (domains or set()) | _domains(word[len(HOSTS_WITHIN) :])
            permission = HOSTS
        if permission not in PERMISSIONS:
            raise ValueError(
                f"unknown permission {permission!r:.40} (known: {', '.join(PERMISSIONS)}, "
                "hosts=DOMAIN,...)"
            )
        permissions.add(permission)
    if HOSTS in words:  # plain `hosts` beside `hosts=...` on one line: any name
        domains = None
    granted = frozenset(permissions), frozenset(domains) if domains is not None else None
    if subject.startswith("@"):
        try:
            return Entry(None, grp.getgrnam(subject[1:]).gr_gid, *granted)
        except KeyError:
            raise ValueError(f"no group {subject[1:]!r:.40}") from None
    try:
        return Entry(pwd.getpwnam(subject).pw_uid, None, *granted)
    except KeyError:
        raise ValueError(f"no user {subject!r:.40}") from None


def _domains(text: str) -> set[bytes]:
    """The domains of `hosts=DOMAIN,...`, in lower case; ValueError if one is no host name."""
    found = set()
    for domain in text.split(","):
        try:
            check_hostname(domain, "hosts= domain")
        except LocalProtocolError as exc:
            raise ValueError(str(exc)) from None
        found.add(domain.lower().encode("ascii"))
    return found


def parse(text: str, path: str) -> Policy:
    """The entries of a policy file's text; PolicyError at the first bad line."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        try:
            entries.append(parse_line(words))
        except ValueError as exc:
            raise PolicyError(f"{path}:{number}: {exc}") from None
    return Policy(path, tuple(entries))


def load_policy(path: str) -> Policy:
    """The policy in the file at path; a missing file allows nothing extra.

    The file gives root's powers away, so it must be root's and writable by root only.
    O_NONBLOCK: a FIFO put in its place must not hang the start (it is refused below).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return Policy(path)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PolicyError(f"{path}: not a regular file")
        if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PolicyError(f"{path}: must be owned by root and writable by root only")
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(MAX_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE:
        raise PolicyError(f"{path}: larger than {MAX_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyError(f"{path}:{line}: not UTF-8 text") from None
    return parse(text, path)

"""The sessions' blocks of the hosts file: each session's (name, address) entries between
marker lines, the file replaced atomically, every other line kept byte for byte.

What goes in comes from unprivileged users, and every user's name lookups read the file,
so nothing given is trusted: entries are checked again, a name the file holds already is
never overridden, and the file is never left half-written.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import stat
import tempfile
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from shuttle_protocol.checks import check_hosts
from shuttle_protocol.errors import LocalProtocolError
from shuttle_protocol.firewall_messages import MAX_HOSTS

from .errors import RequestError

log = logging.getLogger(__name__)

DEFAULT_PATH = "/etc/hosts"
# A full block is about 3 MB (10,000 entries of at most 300 bytes); this leaves room for
# several of them beside any sane admin's file, and refuses a file nobody meant to have.
MAX_FILE = 32 * 1024 * 1024
NEW_FILE_MODE = 0o644  # what every user's resolver needs: readable by all, written by root
NOTE = b"# managed by shuttle-firewalld: removed when the session ends; do not edit\n"
# Only lines of exactly this form are markers (12 hex digits: the session's short id).
_MARKER = re.compile(rb"# shuttle session ([0-9a-f]{12}) (begin|end)\n?")
_SHORT_ID = re.compile(r"[0-9a-f]{12}")
SHOWN_SKIPPED = 5  # skipped names named in the log line; the count says how many in all


def begin_marker(short_id: str) -> bytes:
    return f"# shuttle session {short_id} begin\n".encode("ascii")


def end_marker(short_id: str) -> bytes:
    return f"# shuttle session {short_id} end\n".encode("ascii")


@dataclass(frozen=True)
class Block:
    """One session's block as found in the file, marker lines included."""

    short_id: str
    lines: tuple[bytes, ...]


def split_lines(data: bytes) -> list[bytes]:
    """The lines of data, each with its newline (the last may have none). Only "\\n" ends a
    line, as for the resolver: a "\\r" is part of its line, kept as it is."""
    lines = [line + b"\n" for line in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]  # what follows the last newline has none
    if not lines[-1]:
        lines.pop()
    return lines


def _marker(line: bytes) -> tuple[str, str] | None:
    """(short id, "begin" or "end") if the line is one of our marker lines."""
    match = _MARKER.fullmatch(line)
    if match is None:
        return None
    return match.group(1).decode("ascii"), match.group(2).decode("ascii")


def parse(data: bytes) -> list[bytes | Block]:
    """The file as lines not ours (kept as they are) and blocks.

    A block is a begin line, lines that are not markers, and the end line of the same
    session. Marker lines that form no block (a begin without its end, an end alone) are
    not ours: firewalld replaces the file whole, so it never leaves a block cut short, and
    such lines mean root edited the file by hand. What root wrote is kept, never taken for
    a block and deleted (with a begin running to the end of the file, everything root added
    after it would go).
    """
    lines = split_lines(data)
    markers = [_marker(line) for line in lines]
    parts: list[bytes | Block] = []
    index = 0
    while index < len(lines):
        marker = markers[index]
        if marker is not None and marker[1] == "begin":
            end = index + 1
            while end < len(lines) and markers[end] is None:
                end += 1
            if end < len(lines) and markers[end] == (marker[0], "end"):
                parts.append(Block(marker[0], tuple(lines[index : end + 1])))
                index = end + 1
                continue
        if marker is not None:
            log.warning("a shuttle marker line outside a block is kept as it is: %s", marker)
        parts.append(lines[index])
        index += 1
    return parts


def names_in(line: bytes) -> list[bytes]:
    """The host names a hosts file line gives, in lower case (lookups ignore case)."""
    fields = line.split(b"#", 1)[0].split()
    return [name.lower() for name in fields[1:]]  # the first field is the address


def joined(parts: list[bytes | Block], short_id: str, block: Block | None) -> bytes:
    """The file's bytes with the session's block replaced by block (None: removed).

    The new block takes the place of the session's first one, or goes at the end.
    """
    new = block.lines if block is not None else ()
    lines: list[bytes] = []
    placed = False
    for part in parts:
        if isinstance(part, bytes):
            lines.append(part)
        elif part.short_id != short_id:
            lines.extend(part.lines)
        elif not placed:
            lines.extend(new)
            placed = True
    if new and not placed:
        if lines and not lines[-1].endswith(b"\n"):
            lines[-1] += b"\n"  # the last line had no newline: our marker must not join it
        lines.extend(new)
    return b"".join(lines)


# Names no session may set, even where the file lacks them, since other name services
# answer for them then (glibc itself, systemd's nss-myhostname) or programs look them up on
# their own, and the file, asked first, would take them over: localhost, its subdomains
# (RFC 6761: loopback, always) and the other names distributions give loopback; `wpad` as
# the first label (browsers and the system's proxy settings fetch a proxy configuration
# from wpad.DOMAIN: a name there hands every such user's web traffic to its address); and
# this host's own names (own_names).
LOOPBACK_NAMES = frozenset(
    {
        b"localhost",
        b"localhost.localdomain",
        b"localhost4",
        b"localhost4.localdomain4",
        b"localhost6",
        b"localhost6.localdomain6",
        b"ip6-localhost",
        b"ip6-loopback",
        b"ip6-localnet",
        b"ip6-mcastprefix",
        b"ip6-allnodes",
        b"ip6-allrouters",
        b"ip6-allhosts",
        b"broadcasthost",
    }
)


def reserved(name: bytes) -> bool:
    """Whether a (lower case) name is a loopback name, under .localhost, or a wpad name."""
    return (
        name in LOOPBACK_NAMES or name.endswith(b".localhost") or name.split(b".", 1)[0] == b"wpad"
    )


def _with_first_labels(names: Iterable[str]) -> set[bytes]:
    """The names in lower case, and the first label of each."""
    found: set[bytes] = set()
    for name in names:
        own = name.lower().encode("ascii", "replace")
        found.update((own, own.split(b".", 1)[0]))
    return found


def system_names() -> set[bytes]:
    """This host's names as its resolver gives them (its FQDN and aliases, from /etc/hosts
    or DNS), and their first labels: asked once, when firewalld starts, since a lookup may
    wait on DNS."""
    hostname = socket.gethostname()
    try:
        canonical, aliases, _ = socket.gethostbyname_ex(hostname)
    except (OSError, UnicodeError):  # not resolvable: only gethostname() then
        return set()
    return _with_first_labels([canonical, *aliases, socket.getfqdn(hostname)])


def own_names() -> set[bytes]:
    """This host's name as gethostname() says now, and its first label, in lower case."""
    return _with_first_labels([socket.gethostname()])


def within(name: bytes, domains: Collection[bytes] | None) -> bool:
    """Whether a (lower case) name is one of domains or under one; None allows any name."""
    if domains is None:
        return True
    return any(name == domain or name.endswith(b"." + domain) for domain in domains)


def _check_short_id(short_id: str) -> None:
    if not _SHORT_ID.fullmatch(short_id):
        raise ValueError(f"not a session's short id: {short_id!r:.40}")


class HostsFile:
    """The hosts file at path, as far as the sessions' blocks go.

    Every change is read, change, replace: the file is read whole (at most MAX_FILE bytes),
    the new one written beside it, synced, given the old one's mode and owner, and renamed
    over it. A failure leaves the old file as it was and raises RequestError.
    """

    def __init__(self, path: str = DEFAULT_PATH) -> None:
        self.path = path
        self.system_names = system_names()

    def set(
        self,
        short_id: str,
        entries: Sequence[tuple[str, str]],
        domains: Collection[bytes] | None = None,
    ) -> int:
        """Make the session's block hold these (name, address) entries; how many it holds.

        A name the file gives outside this block (root's entry, another session's), a
        reserved() one, one of this host's own names, and one not within() domains (those
        the policy allows the caller, lower case; None: any) is skipped and logged: a caller
        cannot redirect a name somebody else set. Repeated entries are written once; no
        entries left means no block.
        """
        _check_short_id(short_id)
        entries = tuple(entries)
        try:
            # Again, though the message checked them: what reaches the file passed here.
            check_hosts(entries, "hosts", MAX_HOSTS)
        except LocalProtocolError as exc:
            raise RequestError(str(exc)) from None
        data, info = self._read()
        parts = parse(data)
        taken = own_names() | self.system_names
        for part in parts:
            if isinstance(part, bytes):
                taken.update(names_in(part))
            elif part.short_id != short_id:
                for line in part.lines:
                    taken.update(names_in(line))
        # Dicts: in the request's order, each entry once (names compared as lookups do).
        lines: dict[tuple[bytes, str], bytes] = {}
        skipped: dict[bytes, str] = {}
        for name, address in entries:
            key = name.lower().encode("ascii")  # the check let only ASCII through
            if key in taken or reserved(key) or not within(key, domains):
                skipped.setdefault(key, name)
            else:
                lines.setdefault((key, address), f"{address} {name}\n".encode("ascii"))
        block = None
        if lines:
            block = Block(
                short_id, (begin_marker(short_id), NOTE, *lines.values(), end_marker(short_id))
            )
        self._replace(data, info, joined(parts, short_id, block))
        if skipped:
            shown = ", ".join(list(skipped.values())[:SHOWN_SKIPPED])
            log.info(
                "session %s: %d host names skipped, taken in %s, reserved or not allowed: %s%s",
                short_id,
                len(skipped),
                self.path,
                shown,
                ", ..." if len(skipped) > SHOWN_SKIPPED else "",
            )
        log.info("session %s: %d host entries in %s", short_id, len(lines), self.path)
        return len(lines)

    def remove(self, short_id: str) -> bool:
        """Remove the session's block; whether there was one."""
        _check_short_id(short_id)
        data, info = self._read()
        return self._replace(data, info, joined(parse(data), short_id, None))

    def remove_stale(self) -> int:
        """Remove every session's block, at start (an earlier run may have crashed); how many.

        Lines outside blocks stay, stray marker lines included.
        """
        data, info = self._read()
        parts = parse(data)
        kept = [part for part in parts if isinstance(part, bytes)]
        self._replace(data, info, b"".join(kept))
        stale = len(parts) - len(kept)
        if stale:
            log.info("removed %d stale session blocks from %s", stale, self.path)
        return stale

    def _read(self) -> tuple[bytes, os.stat_result | None]:
        """The file's bytes and its stat; (b"", None) if there is no file."""
        try:
            # O_NOFOLLOW: the file is replaced, and a link replaced by a file is a change
            # of the system's setup nobody asked for. O_NONBLOCK: a FIFO must not hang us.
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return b"", None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise RequestError(
                    f"{self.path} is a symbolic link; firewalld replaces the hosts file, so "
                    "--hosts-file must name the file itself"
                ) from None
            raise RequestError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise RequestError(f"{self.path} is not a regular file")
            if info.st_size > MAX_FILE:  # checked again below: it may grow meanwhile
                raise RequestError(f"{self.path} is larger than {MAX_FILE} bytes; not read")
            with os.fdopen(fd, "rb", closefd=False) as file:
                data = file.read(MAX_FILE + 1)
        except OSError as exc:
            raise RequestError(f"cannot read {self.path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        if len(data) > MAX_FILE:
            raise RequestError(f"{self.path} is larger than {MAX_FILE} bytes; not read")
        return data, info

    def _replace(self, old: bytes, info: os.stat_result | None, new: bytes) -> bool:
        """Replace the file, read as old with info, by new; whether it changed."""
        if new == old:  # also: no file, and nothing to write into one
            return False
        if len(new) > MAX_FILE:
            raise RequestError(f"{self.path} would grow over {MAX_FILE} bytes; it is unchanged")
        directory, name = os.path.split(self.path)
        try:
            # Same directory: a rename within one file system is atomic.
            fd, temporary = tempfile.mkstemp(prefix=f".{name}.shuttle-", dir=directory)
        except OSError as exc:
            raise RequestError(f"cannot write {self.path}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(new)
                file.flush()
                if info is None:
                    os.fchmod(file.fileno(), NEW_FILE_MODE)
                else:
                    # chown first: it clears set-id bits that chmod then puts back.
                    os.fchown(file.fileno(), info.st_uid, info.st_gid)
                    os.fchmod(file.fileno(), stat.S_IMODE(info.st_mode))
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise RequestError(
                f"cannot write {self.path}: {exc.strerror}; it is unchanged"
            ) from None
        try:
            # The rename is in the directory: sync it too, or a crash may undo it.
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            log.warning("%s is replaced, but syncing %s failed: %s", self.path, directory, exc)
        return True

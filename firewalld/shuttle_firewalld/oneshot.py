"""The one-shot mode: a private shuttle-firewalld that shuttle-client starts for itself
through sudo. It serves one caller, the uid sudo names in SUDO_UID (which sudo sets and the
caller cannot), and root; it listens on a socket of its own in a directory only root can
write; it ends when the caller's session ends, when the client goes (its end of our stdin
closes) or when the lease runs out. And `--sudoers`: the line that lets a user start it
without a password, refused where the program is not root's alone."""

from __future__ import annotations

import grp
import os
import pwd
import re
import socket
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from shuttle_local.oneshot import ONE_SHOT_DIR, ONE_SHOT_FLAG, firewalld_program
from shuttle_local.processes import running
from shuttle_protocol.zap import Peer

from .errors import StartupError

MAX_UID = 2**32 - 2  # (uid_t)-1 means "no uid"
# sudoers names: what useradd and groupadd accept (Debian's NAME_REGEX, a little wider).
SUDOERS_NAME = re.compile(r"%?[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")
# A command path sudoers takes as it is: no character it treats specially (, : = \ space).
SUDOERS_PATH = re.compile(r"/[A-Za-z0-9/._+-]+")
READ_BYTES = 4096  # the client writes nothing; whatever comes is read and dropped


def caller_uid(environ: Mapping[str, str]) -> int:
    """The uid we serve: SUDO_UID if sudo started us, else root's. StartupError if it is
    not a uid."""
    value = environ.get("SUDO_UID")
    if value is None:
        return 0
    if not value.isdigit() or int(value) > MAX_UID:
        raise StartupError(f"SUDO_UID is not a uid: {value[:20]!r}")
    return int(value)


def admit_only(uid: int) -> Callable[[Peer], str | None]:
    """A ZAP admit function: the caller and root, nobody else (the socket file's owner and
    mode say the same; this holds even if they were changed)."""

    def admit(peer: Peer) -> str | None:
        if peer.uid in (0, uid):
            return None
        return f"uid {peer.uid}: this one-shot firewalld serves uid {uid} only"

    return admit


def prepare_directory(path: str = ONE_SHOT_DIR) -> None:
    """Make the sockets' directory if it is missing, and check that it is root's and
    writable by root only, and no link: StartupError if not."""
    try:
        os.mkdir(path, 0o700)
        # Now, not through mkdir's mode, which the umask (sudo keeps the user's) may cut.
        os.chmod(path, 0o755)  # noqa: S103  (everyone may look inside; the sockets are 0660)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StartupError(f"cannot make {path}: {exc.strerror}") from None
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise StartupError(
            f"{path} must be a directory of root's that only root may write; remove it"
        )
    remove_dead_sockets(path)


def remove_dead_sockets(path: str) -> int:
    """Remove the socket files that killed one-shot firewalld left in path (nobody listens
    on them); how many. A live one's stay.

    A refused connection alone does not make a socket dead: a one-shot firewalld starting
    beside us has bound its socket and not yet listened on it for a moment (in libzmq,
    between bind and listen), and removing its file then leaves it listening where nobody
    can connect (the likely cause of a rare "no answer within 5 s" in a parallel make test).
    So a file whose name is a running process's pid (other than ours, which has not bound
    yet) stays; one whose pid another process took since stays until that one ends."""
    removed = 0
    for name in os.listdir(path):
        named = re.fullmatch(r"(\d{1,10})\.sock(\.fds)?", name)
        if named is None:
            continue
        pid = int(named[1])
        if pid != os.getpid() and running(pid):
            continue
        socket_file = os.path.join(path, name)
        try:
            if not stat.S_ISSOCK(os.lstat(socket_file).st_mode):
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                probe.connect(socket_file)
        except ConnectionRefusedError:
            os.unlink(socket_file)
            removed += 1
        except OSError:  # gone meanwhile, or busy: not ours to judge
            continue
    return removed


class Caller:
    """Whether the client that started us is still there, and its session: finished()
    once the caller's session ended (closed, or its lease ran out) or our stdin, the
    client's pipe, is closed."""

    def __init__(self, fd: int = 0) -> None:
        self.why: str | None = None
        self._had_session = False
        # Only a pipe or a socket is the client's: a terminal is someone's typing, and
        # /dev/null would end us at once.
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            mode = 0
        self._fd = fd if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) else None
        if self._fd is not None:
            os.set_blocking(self._fd, False)

    @property
    def follows_pipe(self) -> bool:
        """Whether our stdin is the client's pipe, whose end ends us."""
        return self._fd is not None

    def sessions(self, count: int) -> None:
        """Sessions' on_change: the count of open sessions now."""
        if count:
            self._had_session = True
        elif self._had_session and self.why is None:
            self.why = "the caller's session ended"

    def finished(self) -> bool:
        if self.why is None and self._fd is not None:
            try:
                data = os.read(self._fd, READ_BYTES)
            except BlockingIOError:
                return False
            except OSError as exc:
                data = b""
                self.why = f"cannot read from the client: {exc.strerror}"
            if not data and self.why is None:
                self.why = "the client went away"
        return self.why is not None


def sudoers_line(who: str | None, environ: Mapping[str, str]) -> str:
    """The sudoers text that lets who (a user, or %group; default the user who ran sudo, or
    us) start the one-shot firewalld without a password. StartupError if who does not
    exist or the program is not safe to allow."""
    if who is None:
        who = environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
    if not SUDOERS_NAME.fullmatch(who):
        raise StartupError(f"not a user or %group name: {who[:40]!r}")
    try:
        if who.startswith("%"):
            grp.getgrnam(who[1:])
        else:
            pwd.getpwnam(who)
    except KeyError:
        raise StartupError(f"no such {'group' if who.startswith('%') else 'user'}: {who}") from None
    program = firewalld_program()
    if program is None:
        raise StartupError("cannot find shuttle-firewalld beside this python or on PATH")
    if not SUDOERS_PATH.fullmatch(program):
        raise StartupError(f"{program}: a path sudoers cannot take as it is; install elsewhere")
    for path in (program, _interpreter(program), os.path.dirname(__file__)):
        _check_roots_only(path)
    return (
        "# Lets shuttle-client start its private shuttle-firewalld without a password.\n"
        f"# Safe: the command line is fixed ({ONE_SHOT_FLAG}, no other argument is allowed) and\n"
        "# runs no user-supplied command, unlike sshuttle's sudoers rule, which is a root\n"
        "# shell (sshuttle #631). That firewalld serves only the uid that sudo puts in\n"
        "# SUDO_UID, on a socket of its own, and applies only the requests a member of\n"
        "# the shuttle group may make.\n"
        f"{who} ALL=(root) NOPASSWD: {program} {ONE_SHOT_FLAG}\n"
    )


def _interpreter(program: str) -> str:
    """The interpreter of a script's #! line; the program itself if it has none."""
    with open(program, "rb") as file:
        first = file.readline(256)
    if not first.startswith(b"#!"):
        return program
    words = first[2:].split()
    return os.fsdecode(words[0]) if words else program


def _check_roots_only(path: str) -> None:
    """StartupError unless path, what it links to and every directory above them are root's
    and writable by root only (a sticky directory, such as /tmp, may be writable by all):
    whoever could change them would own the command sudo runs as root."""
    for candidate in dict.fromkeys((Path(os.path.abspath(path)), Path(os.path.realpath(path)))):
        for part in (candidate, *candidate.parents):
            info = os.stat(part)
            sticky = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX
            if info.st_uid != 0 or (info.st_mode & 0o022 and not sticky):
                raise StartupError(
                    f"{part} is not root's alone: whoever may change it could run anything "
                    f"as root through the sudoers line; install shuttle-firewalld as root "
                    f"in directories only root may write"
                )

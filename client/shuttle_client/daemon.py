"""-D and --pidfile: going to the background once ready, and the file that names the pid.

The fork happens first thing, before asyncio or zmq exist (neither survives a fork). The
parent waits on a pipe: "ready" and it exits 0; the pipe closing without it means the child
failed, and the parent exits with the child's status. Until it is ready the child keeps
stderr, so its error is on the terminal; then it lets go of stdin, stdout and stderr.
"""

import contextlib
import os
import signal
import sys
from types import FrameType
from typing import Optional

from shuttle_local.processes import running

READY = b"ready\n"
MAX_PIDFILE = 64  # bytes of a pidfile worth reading: a pid and a newline
STALE_TRIES = 3  # another start may recreate the file between our unlink and create
FORWARDED = {signal.SIGINT, signal.SIGTERM}


class Daemon:
    """The child's side of the fork: tells the waiting parent once it is ready."""

    def __init__(self, ready_fd: int) -> None:
        self._ready_fd: Optional[int] = ready_fd

    def ready(self) -> None:
        """Tell the parent (which then exits 0) and point stdin, stdout and stderr at
        /dev/null: the terminal, or whatever the parent had, is no longer ours."""
        if self._ready_fd is None:
            return
        fd, self._ready_fd = self._ready_fd, None
        with contextlib.suppress(OSError):  # the parent is gone: nobody waits for the news
            os.write(fd, READY)
        os.close(fd)
        sys.stdout.flush()
        sys.stderr.flush()
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)
        os.close(null)


def daemonize() -> Daemon:
    """Fork. The parent waits for the child's news and exits (it never returns); the child
    gets a session of its own (no controlling terminal, no terminal signals), / as working
    directory, and the Daemon to say ready with.

    One fork, not two: the second fork of old guards against a session leader acquiring a
    terminal by opening one, and the client never opens a terminal; ssh, its child, is no
    session leader and cannot acquire one either.
    """
    read_fd, write_fd = os.pipe()  # not inherited by ssh and the other programs run later
    # Held back until the parent can forward them: a ^C right after the fork would
    # otherwise end the parent with a KeyboardInterrupt and leave the child unwatched.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    pid = os.fork()
    if pid:
        os.close(write_fd)
        sys.exit(wait_ready(pid, read_fd))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    os.close(read_fd)
    os.setsid()
    os.chdir("/")
    return Daemon(write_fd)


def wait_ready(pid: int, read_fd: int) -> int:
    """The parent: 0 once the child says ready, else the child's exit status. SIGINT or
    SIGTERM meanwhile asks the child to stop (it has its own session: no terminal's ^C)."""

    def forward(signum: int, frame: Optional[FrameType]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    with open(read_fd, "rb") as pipe:
        news = pipe.read(len(READY))
    if news == READY:
        return 0
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        name = signal.Signals(-code).name
        print(f"shuttle-client: error: the daemon was killed by {name}", file=sys.stderr)
        return 128 - code
    return code


class PidFileError(Exception):
    """The pidfile cannot be made: another client runs, or the path is no pidfile."""


class PidFile:
    """A file holding our pid while we run; removed at exit if it still names us."""

    def __init__(self, path: str, pid: int) -> None:
        self.path = path
        self.pid = pid

    @classmethod
    def create(cls, path: str) -> "PidFile":
        """Write our pid to path, replacing a stale pidfile (its process is gone, or it is
        empty); PidFileError if it names a running process or holds something else."""
        pid = os.getpid()
        for _ in range(STALE_TRIES):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = read_pid(path)
                if holder is not None and holder != pid and running(holder):
                    raise PidFileError(
                        f"pidfile {path} names pid {holder}, which is running: is "
                        "shuttle-client already running? (if not, remove the file)"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            except OSError as exc:
                raise PidFileError(f"cannot create pidfile {path}: {exc.strerror}") from None
            with os.fdopen(fd, "w") as file:
                file.write(f"{pid}\n")
            return cls(path, pid)
        raise PidFileError(f"cannot create pidfile {path}: it keeps coming back")

    def remove(self) -> None:
        """Delete the file if it still names us (a later client may have replaced it)."""
        with contextlib.suppress(PidFileError):
            if read_pid(self.path) == self.pid:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)


def read_pid(path: str) -> Optional[int]:
    """The pid a pidfile names; None if it is empty or gone; PidFileError if it holds
    anything but a pid (it is no pidfile of ours, and is left alone)."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PIDFILE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PidFileError(f"cannot read pidfile {path}: {exc.strerror}") from None
    text = data.decode("ascii", "replace").strip()
    if not text:
        return None  # a start that died between creating the file and writing it
    if len(data) > MAX_PIDFILE or not text.isdigit() or int(text) < 1:
        raise PidFileError(f"{path} exists and is not a pidfile: not replacing it")
    return int(text)

    return True

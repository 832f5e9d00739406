"""A private shuttle-firewalld for this client alone, when none answers at the default
socket: `sudo shuttle-firewalld --one-shot` (sudo -n without a terminal; as root, no sudo),
which names its socket on its stdout once it listens, serves only our uid, and ends when
our session is closed or its stdin, our pipe, closes (so also when we are killed).

Only firewalld runs as root: ssh, started by us, keeps the user's keys and agent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import socket

from shuttle_local.oneshot import LISTENING, ONE_SHOT_DIR, ONE_SHOT_FLAG, firewalld_program

from .firewall_session import FirewallError

log = logging.getLogger(__name__)

STOP_WAIT = 10.0  # seconds it may take to remove our rules once its stdin is closed
MAX_LINE = 4096  # bytes of its one line on stdout


def nobody_answers(path: str) -> bool:
    """Whether no firewalld listens at path: no socket file, or one nobody listens on. A
    socket we may not connect to is someone's firewalld: its own error says so later."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return True
        except OSError:
            return False
    return False


def has_terminal() -> bool:
    """Whether sudo can ask for a password here: we have a controlling terminal."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def one_shot_argv(interactive: bool) -> list[str]:
    """The command that starts it: the program's absolute path (sudo's secure_path has no
    venv in it) and its fixed arguments, as `shuttle-firewalld --sudoers` allows them."""
    program = firewalld_program()
    if program is None:
        raise FirewallError(
            "no shuttle-firewalld answers, and none is installed beside this python or on "
            "PATH to start one"
        )
    if os.geteuid() == 0:
        return [program, ONE_SHOT_FLAG]
    sudo = shutil.which("sudo")
    if sudo is None:
        raise FirewallError(f"no shuttle-firewalld answers, and no sudo to start one: {hint()}")
    return [sudo, *([] if interactive else ["-n"]), program, ONE_SHOT_FLAG]


def hint() -> str:
    """How to get a firewalld without sudo asking for a password."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return (
        "start the service (systemctl start shuttle-firewalld) and join its group, or let "
        f"sudo start a private one without a password: shuttle-firewalld --sudoers {user} "
        "| sudo tee /etc/sudoers.d/shuttle"
    )


class PrivateFirewalld:
    """A running one-shot firewalld: its socket's path, and the process (sudo's, or its)."""

    def __init__(self, path: str, process: asyncio.subprocess.Process) -> None:
        self.path = path
        self._process = process

    @classmethod
    async def start(cls, interactive: bool) -> PrivateFirewalld:
        """Start one and wait until it listens (sudo may ask for a password meanwhile);
        FirewallError with what to do instead if it does not."""
        argv = one_shot_argv(interactive)
        log.info("no shuttle-firewalld answers: starting a private one (%s)", " ".join(argv))
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=MAX_LINE
            )
        except OSError as exc:
            raise FirewallError(f"cannot run {argv[0]}: {exc.strerror}") from None
        private = cls("", process)
        if process.stdout is None:
            raise FirewallError("no pipe from the private shuttle-firewalld")  # never: PIPE
        try:
            line = (await process.stdout.readline()).decode("utf-8", "replace").rstrip("\n")
        except ValueError:  # longer than MAX_LINE
            line = ""
        path = line[len(LISTENING) :] if line.startswith(LISTENING) else ""
        # Our end decides where we connect: a socket in root's directory, nowhere else.
        if os.path.dirname(path) != ONE_SHOT_DIR or not path.endswith(".sock"):
            await private.stop()
            raise FirewallError(
                f"the private shuttle-firewalld did not start (exit status "
                f"{process.returncode}): {hint()}"
            )
        private.path = path
        log.info("private shuttle-firewalld listening on %s", path)
        return private

    async def stop(self) -> None:
        """Close its stdin and wait until it has removed our rules and exited; ended with
        SIGTERM (which sudo relays) if it takes longer than STOP_WAIT."""
        process = self._process
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), STOP_WAIT)
            return
        except asyncio.TimeoutError:
            log.warning("the private shuttle-firewalld did not exit within %g s", STOP_WAIT)
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(process.wait(), STOP_WAIT)

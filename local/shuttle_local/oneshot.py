"""What shuttle-client and a one-shot shuttle-firewalld agree on: which program the client
starts through sudo, with which fixed arguments, where that firewalld listens, and the line
it writes on its standard output once it does."""

from __future__ import annotations

import os
import shutil
import sys

ONE_SHOT_FLAG = "--one-shot"
# Root's own directory for the private sockets: no user can write in it, so no user can
# plant a file or a link where firewalld binds, chowns or removes.
ONE_SHOT_DIR = "/run/shuttle-oneshot"
LISTENING = "listening on "  # then the socket's path, one line on stdout, when ready
PROGRAM = "shuttle-firewalld"


def firewalld_program() -> str | None:
    """The absolute path of the shuttle-firewalld installed beside this interpreter (a venv's
    bin), else the one on PATH; None if there is none. Absolute, because sudo looks a bare
    name up in its secure_path, which has no venv in it."""
    beside = os.path.join(os.path.dirname(sys.executable), PROGRAM)
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return os.path.abspath(beside)
    found = shutil.which(PROGRAM)
    return os.path.abspath(found) if found else None


def socket_path(pid: int) -> str:
    """The socket of the one-shot firewalld with this pid."""
    return f"{ONE_SHOT_DIR}/{pid}.sock"

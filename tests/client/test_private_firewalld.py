"""The private firewalld: whom the client starts when no firewalld answers and none was
named, with what command line, and the one clear line when sudo cannot start it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from shuttle_client.private_firewalld import nobody_answers, one_shot_argv

VENV_BIN = Path(sys.executable).parent
FIREWALLD = str(VENV_BIN / "shuttle-firewalld")
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_nobody_answers_at_a_missing_or_dead_socket(tmp_path: Path) -> None:
    assert nobody_answers(str(tmp_path / "none.sock"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(tmp_path / "dead.sock"))  # bound, never listening: a crashed run's
        assert nobody_answers(str(tmp_path / "dead.sock"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(tmp_path / "live.sock"))
        live.listen(1)
        assert not nobody_answers(str(tmp_path / "live.sock"))


@pytest.mark.skipif(os.geteuid() != 0, reason="what root runs")
def test_root_runs_it_without_sudo_by_its_absolute_path() -> None:
    assert one_shot_argv(interactive=True) == [FIREWALLD, "--one-shot"]


def test_without_a_password_or_a_sudoers_entry_one_clear_line() -> None:
    """As a user whom sudo asks for a password (nobody), without a terminal: sudo -n, and
    the client's one line says what to do; no traceback, exit 1, before any ssh."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run as nobody")
    with tempfile.TemporaryDirectory(dir="/tmp") as runtime:
        os.chown(runtime, 65534, 65534)
        result = subprocess.run(
            [
                *NOBODY,
                *("env", "-i", "PATH=/usr/bin:/bin", f"XDG_RUNTIME_DIR={runtime}"),
                *(str(VENV_BIN / "shuttle-client"), "-r", "nowhere.invalid", "10.0.0.0/8"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # no controlling terminal: sudo cannot ask
        )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"sudo -n {FIREWALLD} --one-shot" in result.stderr
    assert "sudo: a password is required" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "shuttle-client: the private shuttle-firewalld did not start (exit status 1): start "
        "the service (systemctl start shuttle-firewalld) and join its group, or let sudo "
        "start a private one without a password: shuttle-firewalld --sudoers nobody | sudo "
        "tee /etc/sudoers.d/shuttle"
    ), result.stderr

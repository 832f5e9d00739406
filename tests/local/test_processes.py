"""shuttle_local.processes.running: a live pid, a reaped one, and numbers no pid can be."""

import os
import subprocess
import sys

from shuttle_local.processes import running


def test_a_process_runs_until_it_is_reaped() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert running(child.pid) and running(os.getpid()) and running(1)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert not running(child.pid)


def test_a_number_beyond_any_pid_runs_nothing() -> None:
    assert not running(9_999_999_999)

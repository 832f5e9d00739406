"""-D, --pidfile and --syslog: the options, the pidfile's rules, and the fork's protocol
(ready: the parent exits 0; a failure: the parent exits with the child's status), with real
processes. tests/integration/test_daemon.py runs the real client as a daemon."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Sequence

import pytest
from shuttle_client.cli import UsageError, parse_args
from shuttle_client.daemon import PidFile, PidFileError, read_pid

WAIT = 10.0
CLIENT = str(Path(sys.executable).with_name("shuttle-client"))


def wait_for(path: Path) -> bool:
    """Whether path appears within WAIT seconds (polled, bounded)."""
    deadline = time.monotonic() + WAIT
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.exists()


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait(WAIT)
    return process.pid


def test_daemon_implies_syslog_and_a_pidfile_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    options = parse_args(["-r", "h", "-D", "10.0.0.0/8"])
    assert (options.daemon, options.syslog) == (True, True)
    assert options.pidfile == str(tmp_path / "shuttle-client.pid")
    options = parse_args(["-r", "h", "--pidfile", "run/c.pid", "--syslog", "10.0.0.0/8"])
    assert (options.daemon, options.syslog, options.pidfile) == (
        False,
        True,
        f"{tmp_path}/run/c.pid",
    )
    options = parse_args(["-r", "h", "10.0.0.0/8"])
    assert (options.daemon, options.syslog, options.pidfile) == (False, False, None)
    with pytest.raises(UsageError, match="--pidfile is empty"):
        parse_args(["-r", "h", "--pidfile=", "10.0.0.0/8"])


def test_the_pidfile_names_us_and_goes_at_the_end(tmp_path: Path) -> None:
    path = str(tmp_path / "c.pid")
    pidfile = PidFile.create(path)
    assert Path(path).read_text() == f"{os.getpid()}\n"
    pidfile.remove()
    assert not Path(path).exists()
    pidfile.remove()  # twice is fine


def test_a_running_process_in_the_pidfile_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.pid"
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            path.write_text(f"{other.pid}\n")
            with pytest.raises(PidFileError, match=f"names pid {other.pid}, which is running"):
                PidFile.create(str(path))
            assert path.read_text() == f"{other.pid}\n"
        finally:
            other.kill()


@pytest.mark.parametrize(
    "stale", ["{dead}\n", "{dead}", "", "\n", "99999999999\n"]
)  # beyond any pid
def test_a_stale_pidfile_is_replaced(tmp_path: Path, stale: str) -> None:
    path = tmp_path / "c.pid"
    path.write_text(stale.format(dead=dead_pid()))
    PidFile.create(str(path))
    assert path.read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("content", ["export PATH=/bin\n", "12 13\n", "0\n", "-5\n", "9" * 70])
def test_a_file_that_is_no_pidfile_is_left_alone(tmp_path: Path, content: str) -> None:
    path = tmp_path / "precious"
    path.write_text(content)
    with pytest.raises(PidFileError, match="is not a pidfile: not replacing it"):
        PidFile.create(str(path))
    assert path.read_text() == content


def test_a_pidfile_that_names_another_process_now_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "c.pid"
    pidfile = PidFile.create(str(path))
    path.write_text("12345\n")  # a later client replaced ours (ours looked stale to it)
    pidfile.remove()
    assert read_pid(str(path)) == 12345


def test_a_pidfile_where_none_can_be_made(tmp_path: Path) -> None:
    with pytest.raises(PidFileError, match=f"cannot create pidfile {tmp_path}/no/c.pid: No such"):
        PidFile.create(str(tmp_path / "no" / "c.pid"))


# The fork, in a small program of its own: the test process itself must not fork.
FORKER = textwrap.dedent(
    """
    import os, sys, time
    from shuttle_client.daemon import daemonize
    report, how = sys.argv[1], sys.argv[2]
    daemon = daemonize()
    print(f"child {os.getpid()} is here", file=sys.stderr, flush=True)
    if how == "ready":
        daemon.ready()
        print("nobody reads this", file=sys.stderr, flush=True)
        with open(report + ".tmp", "w") as out:
            out.write(f"{os.getpid()} {os.getsid(0)} {os.getcwd()} {os.getppid()}")
        os.rename(report + ".tmp", report)
    elif how == "kill":
        os.kill(os.getpid(), 9)
    elif how == "wait":
        with open(report + ".tmp", "w") as out:
            out.write(str(os.getpid()))
        os.rename(report + ".tmp", report)
        time.sleep(60)
    else:
        sys.exit(int(how))
    """
)


def forker(tmp_path: Path, how: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, "-c", FORKER, str(tmp_path / "report"), how],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
        cwd=tmp_path,
    )


def test_ready_lets_the_parent_exit_0_and_the_child_carry_on(tmp_path: Path) -> None:
    result = forker(tmp_path, "ready")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("child ")
    assert "nobody reads this" not in result.stderr
    report = tmp_path / "report"
    assert wait_for(report), "the child did not carry on after ready"
    pid, sid, cwd, _ = report.read_text().split()
    assert result.stderr == f"child {pid} is here\n"
    assert sid == pid, "the child is not the leader of a session of its own"
    assert cwd == "/"


def test_a_child_that_fails_before_ready_gives_the_parent_its_status(tmp_path: Path) -> None:
    result = forker(tmp_path, "3")
    assert result.returncode == 3
    assert result.stderr.startswith("child ")
    result = forker(tmp_path, "kill")
    assert result.returncode == 128 + signal.SIGKILL
    assert result.stderr.endswith("shuttle-client: error: the daemon was killed by SIGKILL\n")


def test_a_signal_to_the_waiting_parent_stops_the_child(tmp_path: Path) -> None:
    """^C on the terminal reaches only the parent: the child has its own session."""
    report = tmp_path / "report"
    argv = [sys.executable, "-c", FORKER, str(report), "wait"]
    with subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=tmp_path) as parent:
        try:
            assert wait_for(report), "the child did not start"
            child = int(report.read_text())
            parent.send_signal(signal.SIGINT)
            _, stderr = parent.communicate(timeout=WAIT)
        finally:
            parent.kill()
    assert parent.returncode == 128 + signal.SIGTERM
    assert stderr.endswith("shuttle-client: error: the daemon was killed by SIGTERM\n")
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # gone, and reaped by the parent


def run_client(args: Sequence[str], cwd: Path) -> "subprocess.CompletedProcess[str]":
    env = {key: value for key, value in os.environ.items() if key != "SHUTTLE_CLIENT_ARGS"}
    env["XDG_RUNTIME_DIR"] = str(cwd)  # where the client makes its control socket
    return subprocess.run(
        [CLIENT, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env=env,
    )


def test_the_client_as_daemon_refuses_a_live_pidfile(tmp_path: Path) -> None:
    path = tmp_path / "c.pid"
    path.write_text(f"{os.getpid()}\n")
    result = run_client(["-D", f"--pidfile={path}", "-r", "h", "10.0.0.0/8"], tmp_path)
    assert result.returncode == 1
    assert f"pidfile {path} names pid {os.getpid()}, which is running" in result.stderr
    assert "Traceback" not in result.stderr
    assert path.read_text() == f"{os.getpid()}\n"


def test_the_client_as_daemon_failing_before_ready(tmp_path: Path, fake_ssh: str) -> None:
    """The child's error is on the parent's stderr, the parent exits 1, no pidfile stays."""
    args = [
        "-D", "-r", "server", "-e", fake_ssh, "--python", sys.executable,
        f"--firewalld={tmp_path}/none.sock", "10.0.0.0/8",
    ]  # fmt: skip
    result = run_client(args, tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"cannot reach shuttle-firewalld at {tmp_path}/none.sock" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "shuttle-client.pid").exists()

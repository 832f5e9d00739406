"""Operations with the real client in the test network: -D with --pidfile (the daemon's pid
in the file, the file and the rules gone after SIGTERM, a live pidfile refused, a stale one
replaced), sd_notify on a real NOTIFY_SOCKET (READY=1 ... STOPPING=1), and arguments from an
@file and SHUTTLE_CLIENT_ARGS."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from testbed import HTTP_PORT, T_ADDR, TARGET_NET, Shuttle, ready_line, shuttle_rules
from testbed.procs import wait_until

pytestmark = pytest.mark.integration

WAIT = 15.0  # bound on a start, a stop, a datagram
MAX_MESSAGES = 32  # STATUS= updates may come before STOPPING=1; not this many


def state(pid: int) -> Optional[str]:
    """The process's state letter (R, S, Z, ...); None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rpartition(")")[2].split()[0]


def running(pid: int) -> bool:
    """Alive, not a zombie nobody has reaped yet."""
    return state(pid) not in (None, "Z")


def cmdline(pid: int) -> List[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait(WAIT)
    return process.pid


def receive_until(manager: socket.socket, line: str) -> List[str]:
    """The messages that arrive (other STATUS= updates, say) up to one with line."""
    messages: List[str] = []
    for _ in range(MAX_MESSAGES):  # each recv times out (and fails the test) after WAIT
        messages.append(manager.recv(4096).decode())
        if line in messages[-1].splitlines():
            return messages
    raise AssertionError(f"no {line} in {MAX_MESSAGES} messages: {messages}")


@contextlib.contextmanager
def stopped_at_the_end(pidfile: Path) -> Iterator[None]:
    """SIGTERM whatever daemon the pidfile names when the test ends, passed or failed."""
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not running(pid), WAIT)


def start_daemon(shuttle: Shuttle, pidfile: Path) -> int:
    """The client with -D and --pidfile, given in an @file; the daemon's pid, from the file,
    once the parent has exited 0."""
    conf = shuttle.topo.write_user_file(
        "daemon.conf", f"# in the background\n--daemon\n--pidfile {pidfile}\n"
    )
    parent = shuttle.start_client(extra=[f"@{conf}"])
    assert parent.wait(WAIT) == 0, f"the parent did not exit 0\n{shuttle.outputs()}"
    pid = int(pidfile.read_text())
    assert pid != parent.pid
    return pid


def test_the_daemon_names_itself_in_the_pidfile_and_cleans_up_on_sigterm(
    shuttle: Shuttle,
) -> None:
    topo = shuttle.topo
    pidfile = topo.home().dir / "client.pid"
    pidfile.write_text(f"{dead_pid()}\n")  # stale: replaced
    with stopped_at_the_end(pidfile):
        pid = start_daemon(shuttle, pidfile)
        assert running(pid), f"pid {pid} from the pidfile is not running\n{shuttle.outputs()}"
        assert any(word.endswith("shuttle-client") for word in cmdline(pid)), cmdline(pid)
        assert os.getsid(pid) == pid, "the daemon has no session of its own"
        assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
        assert shuttle_rules(topo), "no rules while the daemon runs"
        result = topo.curl(T_ADDR, HTTP_PORT, max_time=20)
        assert result.returncode == 0, f"{result.stderr}\n{shuttle.outputs()}"
        assert topo.marker in result.stdout
        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: not running(pid), WAIT), "the daemon did not stop"
        assert not pidfile.exists(), "the pidfile outlived the daemon"
        assert shuttle.wait_rules_gone() == []


def test_a_pidfile_naming_a_running_daemon_is_refused(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    pidfile = topo.home().dir / "client.pid"
    with stopped_at_the_end(pidfile):
        pid = start_daemon(shuttle, pidfile)
        rules = shuttle_rules(topo)
        args = shuttle.client_args(extra=["-D", f"--pidfile={pidfile}"])
        second = topo.run_as_user(args, timeout=WAIT * 2)
        assert second.returncode == 1, f"{second.stderr}\n{shuttle.outputs()}"
        assert f"pidfile {pidfile} names pid {pid}, which is running" in second.stderr
        assert "Traceback" not in second.stderr
        assert pidfile.read_text() == f"{pid}\n"
        assert running(pid)
        assert shuttle_rules(topo) == rules, "the refused client changed the rules"


def test_systemd_hears_ready_then_stopping(shuttle: Shuttle) -> None:
    """Also: the only SUBNET comes from SHUTTLE_CLIENT_ARGS."""
    topo = shuttle.topo
    path = topo.home().dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        os.chown(path, topo.user.uid, topo.user.gid)
        manager.settimeout(WAIT)
        env = {"NOTIFY_SOCKET": str(path), "SHUTTLE_CLIENT_ARGS": TARGET_NET}
        client = shuttle.start_client(subnets=(), env=env)
        assert TARGET_NET in ready_line(client)
        ready = receive_until(manager, "READY=1")[-1]
        assert ready.startswith("READY=1\nSTATUS=capturing through "), ready
        assert shuttle.stop_client(client) == 0, shuttle.outputs()
        assert receive_until(manager, "STOPPING=1")[-1] == "STOPPING=1\n"
    assert shuttle.wait_rules_gone() == []

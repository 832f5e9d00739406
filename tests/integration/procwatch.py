"""What the soak and limit tests watch: the client's and the agent's open descriptors and
resident memory, read from /proc, and tool programs held open while they do.

The namespaces share the host's pid namespace, so the tests (root) read /proc/PID of the
client in C and of the agent in S directly. The agent is the python3 that the test user's
ssh session on S execs (stage 1 is `exec python3 -c ...`).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from testbed import LocalUser, Topology
from testbed.procs import wait_until

HERE = Path(__file__).resolve().parent


def install_tool(topo: Topology, source: Path) -> Path:
    """Copy a standalone tool beside tcptool.py, where every user (and T's root) reads it."""
    target = topo.tcptool_path.parent / source.name
    shutil.copyfile(source, target)
    target.chmod(0o644)
    return target


def fd_count(pid: int) -> int:
    """Open descriptors of pid (entries of /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    """Resident memory of pid (VmRSS), in KiB; 0 for a zombie."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _uid(pid: int) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def agent_pids(topo: Topology, user: Optional[LocalUser] = None) -> List[int]:
    """The agents running on S for user (default the first test user): S's python processes
    owned by that user."""
    uid = (user or topo.user).uid
    return sorted(
        pid for pid in topo.s.pids() if _uid(pid) == uid and _comm(pid).startswith("python")
    )


def agent_pid(topo: Topology, timeout: float = 10) -> int:
    """The one agent of the first test user; AssertionError if there is not exactly one."""
    wait_until(lambda: len(agent_pids(topo)) == 1, timeout, interval=0.1)
    pids = agent_pids(topo)
    assert len(pids) == 1, f"expected one agent on S, found {pids}"
    return pids[0]


@dataclass(frozen=True)
class Usage:
    """One reading of a process: open descriptors and resident memory."""

    fds: int
    rss_kib: int


def usage(pid: int) -> Usage:
    return Usage(fd_count(pid), rss_kib(pid))


class HeldTool:
    """A tool run as the test user in C with pipes: its JSON lines are read with deadlines,
    stdin stays open until close() (tools wait on it), and its process group is killed at
    the end whatever happened."""

    def __init__(self, topo: Topology, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.errors = tempfile.TemporaryFile()
        self.popen = subprocess.Popen(
            topo.user_argv(self.argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            start_new_session=True,
            cwd=topo.user_dir,
        )
        self._buffer = b""

    def line(self, timeout: float) -> Dict[str, Any]:
        """The tool's next JSON line; {"ok": False, "error": ...} if none within timeout."""
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        for _ in range(100_000):  # each turn reads something, or ends at the deadline
            if b"\n" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\n", 1)
                try:
                    parsed: Dict[str, Any] = json.loads(raw)
                except ValueError:
                    continue  # not a result line
                return parsed
            left = deadline - time.monotonic()
            if left <= 0:
                break
            readable, _w, _x = select.select([fd], [], [], left)
            chunk = os.read(fd, 65536) if readable else b""
            if readable and not chunk:
                break
            self._buffer += chunk
        return {"ok": False, "error": f"no line within {timeout}s", "stderr": self.stderr()}

    def send(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text.encode())
        self.popen.stdin.flush()

    def finish(self, timeout: float) -> Dict[str, Any]:
        """Close stdin and read the tool's last line."""
        assert self.popen.stdin is not None
        self.popen.stdin.close()
        return self.line(timeout)

    def stderr(self) -> str:
        self.errors.seek(0)
        return self.errors.read().decode(errors="replace")[-2000:]

    def close(self) -> None:
        try:
            os.killpg(self.popen.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait(10)
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()
        self.errors.close()

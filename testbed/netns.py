"""Network namespaces: create, run commands inside, kill everything inside, delete."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import List, Optional, Sequence

from testbed.procs import CommandError, Proc, run, wait_until

# Names this package gives its namespaces: sh<pid>-<n><role>, role one of c, s, t.
NAME_RE = re.compile(r"^sh(\d+)-\d+[cst]$")
# `ip netns exec NAME` bind-mounts each file of /etc/netns/NAME over the same name in /etc,
# for the command and its children: a namespace's own resolv.conf and hosts.
ETC_NETNS = Path("/etc/netns")


def list_namespaces() -> List[str]:
    out = run(["ip", "netns", "list"], timeout=10, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


class Namespace:
    """One named network namespace (ip netns), with loopback up."""

    def __init__(self, name: str):
        self.name = name

    def create(self) -> None:
        run(["ip", "netns", "add", self.name], timeout=10, check=True)
        self.ip("link", "set", "lo", "up")

    @property
    def etc(self) -> Path:
        return ETC_NETNS / self.name

    def write_etc(self, name: str, text: str) -> None:
        """/etc/NAME as processes started in this namespace (after this call) see it."""
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / name).write_text(text)

    def ip(self, *args: str) -> None:
        run(["ip", "-n", self.name, *args], timeout=10, check=True)

    def sysctl(self, key: str, value: str) -> None:
        self.run(["sysctl", "-qw", f"{key}={value}"], check=True)

    def argv(self, argv: Sequence[str]) -> List[str]:
        """argv run inside this namespace as root (ip netns exec execs it, no extra process)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30,
        check: bool = False,
        stdin: Optional[bytes] = None,
    ) -> subprocess.CompletedProcess[str]:
        return run(self.argv(argv), timeout=timeout, check=check, stdin=stdin)

    def start(self, name: str, argv: Sequence[str], log: Path, cwd: Optional[Path] = None) -> Proc:
        return Proc(name, self.argv(argv), log, cwd)

    def pids(self) -> List[int]:
        try:
            out = run(["ip", "netns", "pids", self.name], timeout=10).stdout
        except CommandError:
            return []
        return [int(word) for word in out.split() if word.isdigit()]

    def has_link_local(self, dev: str) -> bool:
        """Whether dev has its IPv6 link-local address, past duplicate address detection (the
        kernel adds it, with its route in the local table, a while after the link is up)."""
        argv = ["ip", "-n", self.name, "-6", "-o", "addr", "show", "dev", dev, "scope", "link"]
        out = run(argv, timeout=10, check=True).stdout
        return any("tentative" not in line for line in out.splitlines())

    def listeners(self, port: int, udp: bool = False) -> List[str]:
        """The local addresses (as ss shows them) of TCP sockets listening on port here, or
        with udp of UDP sockets bound to it."""
        flags = "-Huln" if udp else "-Htln"
        out = self.run(["ss", flags, f"sport = :{port}"], timeout=10).stdout
        return [line.split()[3] for line in out.splitlines() if len(line.split()) > 3]

    def listening(self, port: int, udp: bool = False) -> bool:
        """True if a TCP socket in this namespace listens on port (udp: a UDP one is bound)."""
        return bool(self.listeners(port, udp))

    def wait_listening(
        self, port: int, timeout: float = 10, count: int = 1, udp: bool = False
    ) -> bool:
        """Wait until at least count sockets listen on port (one per address, say)."""
        return wait_until(lambda: len(self.listeners(port, udp)) >= count, timeout, interval=0.1)

    def kill_all(self, timeout: float = 10) -> List[int]:
        """SIGKILL every process in the namespace; return the pids still alive after timeout."""
        for _ in range(20):
            pids = self.pids()
            if not pids:
                return []
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if wait_until(lambda: not self.pids(), timeout / 20, interval=0.05):
                return []
        return self.pids()

    def delete(self) -> None:
        if self.name in list_namespaces():
            run(["ip", "netns", "del", self.name], timeout=10, check=True)
        if self.etc.exists():
            shutil.rmtree(self.etc)


def remove_stale() -> List[str]:
    """Delete namespaces left by an earlier run of this package whose process is gone.

    Only names this package generates are considered, and only when the pid in the name is
    no longer alive, so a concurrent run is never disturbed.
    """
    removed = []
    names = set(list_namespaces())
    if ETC_NETNS.is_dir():
        names.update(path.name for path in ETC_NETNS.iterdir())
    for name in sorted(names):
        match = NAME_RE.match(name)
        if not match or Path(f"/proc/{match.group(1)}").exists():
            continue
        ns = Namespace(name)
        ns.kill_all()
        ns.delete()
        removed.append(name)
    return removed

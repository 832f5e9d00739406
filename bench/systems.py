"""The tunnels the bench compares, started and stopped the same way.

  shuttle   shuttle-client as the test user (shuttle-firewalld runs as root), capturing the
            target network; the echo and iperf3 servers are reached at the target's address.
            TCP goes as the default (--tcp=auto) sends it: through ssh's own forwarding.
  shuttle-agent
            the same with --tcp=agent: every byte through the agent's session.
  ssh-L     ssh -N -L as the test user, one forward per server, on C's loopback.
  ssh-L-redirect
            the same forwards, reached at the target's address: a rule in C's nat output
            redirects the test user's connections there to them. What a shortcut (a
            firewalld redirect to a forward of the master's) would give at best; asked for
            by name only.
  sshuttle  sshuttle as root (its nat method captures every user's traffic, the test user's
            tools included), capturing the target network.

All three log in to the same sshd as the test user, with its key and the same cipher; through
the delaying relay they use its port instead of sshd's.
"""

from __future__ import annotations

import itertools
import shlex
import shutil
import signal
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import processes
from bench.probes import CaseFailed
from bench.servers import ECHO_PORT, IPERF_PORT, RELAY_PORT
from testbed.config import S_ADDR_C, SYSTEM_PYTHON, T_ADDR, TARGET_NET
from testbed.procs import Proc, run, wait_until
from testbed.shuttle import Shuttle, shuttle_rules
from testbed.topology import Topology

STOP_TIMEOUT = 30.0
STOP_POLL = 0.005  # the resolution of a stop time
_launches = itertools.count()


@dataclass
class Tunnel:
    """One running tunnel: its main process, and how to tell its firewall rules are gone."""

    proc: Proc
    rules: Callable[[], list[str]]
    undo: Callable[[], None] = lambda: None  # what the bench set up for it, removed at stop

    def alive(self) -> bool:
        return self.proc.alive()

    def stop(self, timeout: float = STOP_TIMEOUT) -> float:
        """SIGTERM; the seconds until all its processes have exited and its firewall rules
        are gone. CaseFailed if that takes over timeout (what is left is killed)."""
        family = processes.tree(self.proc.pid)
        started = time.monotonic()
        self.proc.send(signal.SIGTERM)
        exited = wait_until(lambda: not processes.running(family), timeout, STOP_POLL)
        took = time.monotonic() - started
        self.undo()
        left = self.rules()
        if left:  # checked once at exit: listing the rules takes longer than a poll
            gone = wait_until(lambda: not self.rules(), timeout, 0.05)
            took = time.monotonic() - started
            left = [] if gone else self.rules()
        self.proc.stop(timeout=1)  # reaps it, kills what is left of its process group
        processes.kill(family)
        if not exited:
            raise CaseFailed(f"{self.proc.name} still ran {timeout:g} s after SIGTERM")
        if left:
            raise CaseFailed(f"{self.proc.name} left firewall rules: {left[:2]}")
        return took


class System(ABC):
    """How to start one kind of tunnel, and where the servers are reached through it."""

    name = ""
    echo = (T_ADDR, ECHO_PORT)
    iperf = (T_ADDR, IPERF_PORT)
    takes_excludes = True  # an exclude file makes sense for it
    takes_streams = False  # it has shuttle's --streams

    def __init__(self, topo: Topology, cipher: str) -> None:
        self.topo = topo
        self.cipher = cipher

    def ssh_argv(self, relay: bool) -> list[str]:
        port = ["-p", str(RELAY_PORT)] if relay else []
        return ["ssh", *self.topo.ssh_options(), "-c", self.cipher, *port]

    def log_name(self) -> str:
        return f"{self.name}-{next(_launches)}"

    @abstractmethod
    def launch(self, *, relay: bool, streams: int, excludes: Path | None) -> Tunnel:
        """Start the tunnel and return at once (the bench times its start)."""


class ShuttleClient(System):
    name = "shuttle"
    takes_streams = True
    tcp: tuple[str, ...] = ()  # the default path

    def __init__(self, topo: Topology, cipher: str, shuttle: Shuttle, method: str) -> None:
        super().__init__(topo, cipher)
        self.shuttle = shuttle
        self.method = method

    def launch(self, *, relay: bool, streams: int, excludes: Path | None) -> Tunnel:
        args = self.shuttle.client_args(
            method=self.method, exclude_files=[excludes] if excludes else []
        )
        args[args.index("-e") + 1] = shlex.join(self.ssh_argv(relay))
        if streams != 1:  # 1 is the default: leaving it out works with any client
            args.insert(1, f"--streams={streams}")
        args[1:1] = self.tcp
        env = self.topo.user_env([str(self.shuttle.venv.bin)])
        proc = self.topo.start(self.log_name(), self.topo.user_argv(args, env))
        return Tunnel(proc, lambda: shuttle_rules(self.topo))


class ShuttleAgentPath(ShuttleClient):
    name = "shuttle-agent"
    tcp = ("--tcp=agent",)


class SshForward(System):
    name = "ssh-L"
    # Each forward listens on C's loopback on the port the server has on T.
    echo = ("127.0.0.1", ECHO_PORT)
    iperf = ("127.0.0.1", IPERF_PORT)
    takes_excludes = False

    def launch(self, *, relay: bool, streams: int, excludes: Path | None) -> Tunnel:
        return Tunnel(self.start_forwards(relay), lambda: [])  # no firewall rules

    def start_forwards(self, relay: bool) -> Proc:
        """ssh -N with a forward on C's loopback for each server, on the server's port."""
        forwards = []
        for _, port in (self.echo, self.iperf):
            forwards += ["-L", f"127.0.0.1:{port}:{T_ADDR}:{port}"]
        argv = [
            *self.ssh_argv(relay),
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            *forwards,
            f"{self.topo.user.name}@{S_ADDR_C}",
        ]
        return self.topo.start(self.log_name(), self.topo.user_argv(argv))


class SshForwardRedirected(SshForward):
    name = "ssh-L-redirect"
    echo = (T_ADDR, ECHO_PORT)
    iperf = (T_ADDR, IPERF_PORT)
    TABLE = "bench-redirect"

    def launch(self, *, relay: bool, streams: int, excludes: Path | None) -> Tunnel:
        # A redirect keeps the port: T's echo and iperf3 ports become the forwards' own.
        rules = (
            f"table ip {self.TABLE} {{ chain out {{ type nat hook output priority -100; "
            f"meta skuid {self.topo.user.uid} ip daddr {T_ADDR} "
            f"tcp dport {{ {ECHO_PORT}, {IPERF_PORT} }} redirect\n}}\n}}\n"
        )
        self.topo.c.run(["nft", "-f", "-"], stdin=rules.encode(), timeout=15, check=True)
        return Tunnel(self.start_forwards(relay), self._rules, self._remove)

    def _rules(self) -> list[str]:
        listing = self.topo.c.run(["nft", "list", "tables"], timeout=15).stdout
        return [line for line in listing.splitlines() if self.TABLE in line]

    def _remove(self) -> None:
        self.topo.c.run(["nft", "delete", "table", "ip", self.TABLE], timeout=15)


class Sshuttle(System):
    name = "sshuttle"

    def __init__(self, topo: Topology, cipher: str, program: Path) -> None:
        super().__init__(topo, cipher)
        self.program = program

    def launch(self, *, relay: bool, streams: int, excludes: Path | None) -> Tunnel:
        argv = [
            str(self.program),
            "-r",
            f"{self.topo.user.name}@{S_ADDR_C}",
            "-e",
            shlex.join(self.ssh_argv(relay)),
            "--python",
            SYSTEM_PYTHON,
            "--method",
            "nat",
            *(["-X", str(excludes)] if excludes else []),
            TARGET_NET,
        ]
        proc = self.topo.start(self.log_name(), self.topo.c.argv(argv))
        # testbed's pattern ("shuttle", any case) matches sshuttle's chains too.
        return Tunnel(proc, lambda: shuttle_rules(self.topo))


class SshuttleVenv:
    """sshuttle from PyPI in a venv of its own, for this run only (it runs as root)."""

    def __init__(self, requirement: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="shuttle-bench-sshuttle-"))
        self.program = self.root / "bin" / "sshuttle"
        try:
            run([SYSTEM_PYTHON, "-m", "venv", str(self.root)], timeout=120, check=True)
            pip = [str(self.root / "bin" / "pip"), "install", "--quiet", "--no-input"]
            run([*pip, requirement], timeout=600, check=True)
        except BaseException:
            self.remove()
            raise

    def version(self) -> str:
        return run([str(self.program), "--version"], timeout=30).stdout.strip()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

"""Starting shuttle-firewalld (root) and shuttle-client (the test user) in the client host.

Both are started from the user venv and are ready when they log their ready line; a start
that does not get there raises StartupError carrying the output of both.
"""

from __future__ import annotations

import re
import signal
from typing import List, Optional, Sequence

from testbed.config import S_ADDR_C, SYSTEM_PYTHON, TARGET_NET
from testbed.procs import Proc
from testbed.topology import Topology
from testbed.venv import UserVenv

FIREWALLD_READY = "shuttle-firewalld: listening on ipc://"
CLIENT_READY = "shuttle-client: ready"
READY_TIMEOUT = 20.0
CHAIN_RE = re.compile(r"shuttle", re.IGNORECASE)


class StartupError(RuntimeError):
    """A shuttle program did not report ready in time; the message has everyone's output."""


def _matching(topo: Topology, argv: List[str]) -> List[str]:
    result = topo.c.run(argv, timeout=15, check=True)
    return [line for line in result.stdout.splitlines() if CHAIN_RE.search(line)]


def nat_rules(topo: Topology) -> List[str]:
    """shuttle's lines in iptables-save of C's nat table (the nat method's SHUTTLE-* chains)."""
    return _matching(topo, ["iptables-save", "-t", "nat"])


def shuttle_rules(topo: Topology) -> List[str]:
    """Everything of shuttle's in C's firewall: the nat chains, and any nft table or chain
    (`nft list ruleset` also shows native nft tables, should firewalld use that method).
    """
    return nat_rules(topo) + _matching(topo, ["nft", "list", "ruleset"])


class Shuttle:
    """firewalld and clients of one test network; stop() or the topology's teardown ends them."""

    def __init__(self, topo: Topology, venv: UserVenv, lease: int = 3):
        self.topo = topo
        self.venv = venv
        self.lease = lease
        self.socket = topo.fw_dir / "firewalld.sock"
        self.firewalld: Optional[Proc] = None
        self.clients: List[Proc] = []

    def firewalld_argv(self) -> List[str]:
        return self.topo.c.argv(
            [
                self.venv.program("shuttle-firewalld"),
                "--socket",
                str(self.socket),
                "--group",
                self.topo.user.group,
                "--lease",
                str(self.lease),
            ]
        )

    def client_args(
        self,
        *,
        subnets: Sequence[str] = (TARGET_NET,),
        excludes: Sequence[str] = (),
        login: Optional[str] = None,
        python: str = SYSTEM_PYTHON,
        extra: Sequence[str] = (),
    ) -> List[str]:
        """shuttle-client's command line (run as the test user)."""
        args = [
            self.venv.program("shuttle-client"),
            "-r",
            f"{login or self.topo.user.name}@{S_ADDR_C}",
            "-e",
            self.topo.ssh_command(),
            "--python",
            python,
            "--firewalld",
            str(self.socket),
        ]
        for exclude in excludes:
            args += ["-x", exclude]
        return [*args, *extra, *subnets]

    def outputs(self) -> str:
        procs = ([self.firewalld] if self.firewalld else []) + self.clients
        return "\n".join(proc.describe() for proc in procs)

    def start_firewalld(self, timeout: float = READY_TIMEOUT) -> Proc:
        proc = self.topo.start("firewalld", self.firewalld_argv())
        self.firewalld = proc
        if not proc.wait_for_line(FIREWALLD_READY, timeout):
            raise StartupError(f"shuttle-firewalld not ready within {timeout}s\n{self.outputs()}")
        return proc

    def start_client(
        self,
        *,
        subnets: Sequence[str] = (TARGET_NET,),
        excludes: Sequence[str] = (),
        login: Optional[str] = None,
        python: str = SYSTEM_PYTHON,
        extra: Sequence[str] = (),
        timeout: float = READY_TIMEOUT,
    ) -> Proc:
        args = self.client_args(
            subnets=subnets, excludes=excludes, login=login, python=python, extra=extra
        )
        argv = self.topo.user_argv(args, self.topo.user_env([str(self.venv.bin)]))
        proc = self.topo.start(f"client{len(self.clients)}", argv)
        self.clients.append(proc)
        if not proc.wait_for_line(CLIENT_READY, timeout):
            raise StartupError(f"shuttle-client not ready within {timeout}s\n{self.outputs()}")
        return proc

    def stop(self) -> List[str]:
        """SIGTERM the clients, then firewalld; return complaints about their exit codes."""
        problems = []
        for proc in [*self.clients, *([self.firewalld] if self.firewalld else [])]:
            code = proc.stop(timeout=10, sig=signal.SIGTERM)
            if code not in (0, -signal.SIGKILL):  # a test may have killed a client on purpose
                problems.append(f"{proc.name} exited with {code}")
        return problems

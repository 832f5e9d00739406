"""Starting shuttle-firewalld (root) and shuttle-client (the test user) in the client host.

Both are started from the user venv and are ready when they log their ready line; a start
that does not get there raises StartupError carrying the output of both.

The firewall as the two methods leave it, in C:
  nft: one table `inet shuttle-<12 hex>` per session (`nft list tables`);
  nat: chains SHUTTLE-<12 hex> in the nat tables of iptables and ip6tables.
(iptables here may be iptables-nft, whose tables `ip nat` / `ip6 nat` nft shows as well.)
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from testbed.config import S_ADDR_C, SYSTEM_PYTHON, TARGET_NET, url_host
from testbed.procs import Proc, wait_until
from testbed.topology import Topology
from testbed.user import LocalUser
from testbed.venv import UserVenv

FIREWALLD_READY = "shuttle-firewalld: listening on ipc://"
CLIENT_READY = "shuttle-client: ready"
READY_TIMEOUT = 20.0
CHAIN_RE = re.compile(r"shuttle", re.IGNORECASE)
NFT_TABLE_RE = re.compile(r"^table inet (shuttle-[0-9a-f]{12})\s*$")
NAT_CHAIN_RE = re.compile(r"^:(SHUTTLE-[0-9a-fA-F]{12})\s")
READY_METHOD_RE = re.compile(r"\bmethod (\w+)")
METHODS = ("nft", "nat")


class StartupError(RuntimeError):
    """A shuttle program did not report ready in time; the message has everyone's output."""


def _matching(topo: Topology, argv: List[str]) -> List[str]:
    result = topo.c.run(argv, timeout=15, check=True)
    return [line for line in result.stdout.splitlines() if CHAIN_RE.search(line)]


def nat_rules(topo: Topology) -> List[str]:
    """shuttle's lines in iptables-save of C's nat table (the nat method's SHUTTLE-* chains)."""
    return _matching(topo, ["iptables-save", "-t", "nat"])


def nat6_rules(topo: Topology) -> List[str]:
    """shuttle's lines in ip6tables-save of C's nat table."""
    return _matching(topo, ["ip6tables-save", "-t", "nat"])


def shuttle_rules(topo: Topology) -> List[str]:
    """Everything of shuttle's in C's firewall: the nat chains of iptables and ip6tables, and
    any nft table, chain or rule that names shuttle (`nft list ruleset` shows every table).
    """
    return nat_rules(topo) + nat6_rules(topo) + _matching(topo, ["nft", "list", "ruleset"])


def nft_tables(topo: Topology) -> List[str]:
    """Names of the nft method's tables in C (`inet shuttle-<12 hex>`, one per session)."""
    out = topo.c.run(["nft", "list", "tables"], timeout=15, check=True).stdout
    return [m.group(1) for m in map(NFT_TABLE_RE.match, out.splitlines()) if m]


def nat_chains(topo: Topology) -> Dict[int, List[str]]:
    """The nat method's SHUTTLE-<12 hex> chains in C, by IP version (4: iptables, 6: ip6tables)."""
    chains = {}
    for version, tool in ((4, "iptables-save"), (6, "ip6tables-save")):
        out = topo.c.run([tool, "-t", "nat"], timeout=15, check=True).stdout
        chains[version] = [m.group(1) for m in map(NAT_CHAIN_RE.match, out.splitlines()) if m]
    return chains


def wait_rules_gone(topo: Topology, timeout: float = 5) -> List[str]:
    """Wait (bounded) until C has no shuttle rule left; return what is left, if anything."""
    wait_until(lambda: not shuttle_rules(topo), timeout, interval=0.1)
    return shuttle_rules(topo)


def ready_line(proc: Proc) -> str:
    """The client's ready line ("shuttle-client: ready ..."), or "" if it has none."""
    return next((ln for ln in proc.output().splitlines() if ln.startswith(CLIENT_READY)), "")


def ready_method(proc: Proc) -> Optional[str]:
    """The method the client's ready line names ("... method nft ..."), if any."""
    match = READY_METHOD_RE.search(ready_line(proc))
    return match.group(1) if match else None


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
        method: Optional[str] = None,
        remote: str = S_ADDR_C,
        user: Optional[LocalUser] = None,
        include_files: Sequence[Path] = (),
        exclude_files: Sequence[Path] = (),
    ) -> List[str]:
        """shuttle-client's command line (run as user, default the first test user).

        remote is S's address to ssh to (IPv4 or IPv6); method None leaves --method out
        (the client's default); the files become -s FILE and -X FILE.
        """
        user = user or self.topo.user
        args = [
            self.venv.program("shuttle-client"),
            "-r",
            f"{login or user.name}@{url_host(remote)}",
            "-e",
            self.topo.ssh_command(user),
            "--python",
            python,
            "--firewalld",
            str(self.socket),
        ]
        if method is not None:
            args.append(f"--method={method}")
        for exclude in excludes:
            args += ["-x", exclude]
        for path in exclude_files:
            args += ["-X", str(path)]
        for path in include_files:
            args += ["-s", str(path)]
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
        method: Optional[str] = None,
        remote: str = S_ADDR_C,
        user: Optional[LocalUser] = None,
        include_files: Sequence[Path] = (),
        exclude_files: Sequence[Path] = (),
        timeout: float = READY_TIMEOUT,
    ) -> Proc:
        """Start shuttle-client as user (default the first test user); wait for ready.

        With method given, the ready line must name it ("method nft"), else StartupError.
        """
        args = self.client_args(
            subnets=subnets,
            excludes=excludes,
            login=login,
            python=python,
            extra=extra,
            method=method,
            remote=remote,
            user=user,
            include_files=include_files,
            exclude_files=exclude_files,
        )
        env = self.topo.user_env([str(self.venv.bin)], user=user)
        argv = self.topo.user_argv(args, env, user=user)
        proc = self.topo.start(f"client{len(self.clients)}", argv, user=user)
        self.clients.append(proc)
        if not proc.wait_for_line(CLIENT_READY, timeout):
            raise StartupError(f"shuttle-client not ready within {timeout}s\n{self.outputs()}")
        if method is not None and ready_method(proc) != method:
            raise StartupError(
                f"shuttle-client's ready line does not say 'method {method}': "
                f"{ready_line(proc)!r}\n{self.outputs()}"
            )
        return proc

    def stop_client(self, proc: Proc, timeout: float = 15) -> Optional[int]:
        """SIGTERM one client and wait for it; its exit code (None if it had to be killed)."""
        return proc.stop(timeout=timeout, sig=signal.SIGTERM)

    def stop(self) -> List[str]:
        """SIGTERM the clients, then firewalld; return complaints about their exit codes."""
        return self.stop_clients() + self.stop_firewalld()

    def stop_clients(self) -> List[str]:
        """SIGTERM every client still running; return complaints about their exit codes."""
        return self._stop(self.clients)

    def stop_firewalld(self) -> List[str]:
        return self._stop([self.firewalld] if self.firewalld else [])

    @staticmethod
    def _stop(procs: Sequence[Proc]) -> List[str]:
        problems = []
        for proc in procs:
            code = proc.stop(timeout=10, sig=signal.SIGTERM)
            if code not in (0, -signal.SIGKILL):  # a test may have killed a client on purpose
                problems.append(f"{proc.name} exited with {code}")
        return problems

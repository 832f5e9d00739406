"""Starting shuttle-firewalld (root) and shuttle-client (the test user) in the client host.

Both are started from the user venv and are ready when they log their ready line; a start
that does not get there raises StartupError carrying the output of both.

The firewall as the methods leave it, in C:
  nft: one table `inet shuttle-<12 hex>` per session (`nft list tables`);
  nat: chains SHUTTLE-<12 hex> in the nat tables of iptables and ip6tables;
  tproxy: an nft table as nft's, and policy routing besides: per session and IP version an
        `ip rule` "fwmark M lookup T" and a routing table T with a local default route.
(iptables here may be iptables-nft, whose tables `ip nat` / `ip6 nat` nft shows as well.)

The policy routing is judged against a snapshot taken before shuttle started
(routing_state): a fwmark rule, or a routing table, that was not there before is shuttle's.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, NamedTuple, Optional, Sequence

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
METHODS = ("nft", "nat", "tproxy")  # the methods the general tests run with
TPROXY = "tproxy"  # tested on its own (tests/integration/test_tproxy.py): it also does UDP
ROUTE_TABLE_RE = re.compile(r"\btable (\S+)")


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


class Routing(NamedTuple):
    """C's policy routing, both families: the fwmark rules, and the routes by table."""

    rules: FrozenSet[str]  # "ip -4 rule: 32765: from all fwmark 0x... lookup ..."
    routes: Dict[str, List[str]]  # "ip -6 table local" -> that table's route lines

    def tables(self) -> FrozenSet[str]:
        return frozenset(self.routes)


def routing_state(topo: Topology) -> Routing:
    """The fwmark rules of `ip rule` / `ip -6 rule` in C, and every route of `ip route show
    table all` / `ip -6 route show table all`, grouped by table (no "table" word: main)."""
    rules = set()
    routes: Dict[str, List[str]] = {}
    for version in ("-4", "-6"):
        out = topo.c.run(["ip", version, "rule", "show"], timeout=15, check=True).stdout
        rules |= {f"ip {version} rule: {ln.strip()}" for ln in out.splitlines() if "fwmark" in ln}
        argv = ["ip", version, "route", "show", "table", "all"]
        for line in topo.c.run(argv, timeout=15, check=True).stdout.splitlines():
            match = ROUTE_TABLE_RE.search(line)
            table = f"ip {version} table {match.group(1) if match else 'main'}"
            routes.setdefault(table, []).append(line.strip())
    return Routing(frozenset(rules), routes)


def routing_leftovers(topo: Topology, before: Routing) -> List[str]:
    """C's fwmark rules and routing tables (each route of them) that were not there before:
    the tproxy method's, left behind."""
    now = routing_state(topo)
    found = sorted(now.rules - before.rules)
    for table in sorted(now.tables() - before.tables()):
        found += [f"{table}: {route}" for route in now.routes[table]]
    return found


def leftovers(topo: Topology, routing: Optional[Routing] = None) -> List[str]:
    """shuttle_rules, and with a snapshot from before shuttle started, its routing_leftovers."""
    found = shuttle_rules(topo)
    return found + (routing_leftovers(topo, routing) if routing is not None else [])


def wait_rules_gone(
    topo: Topology, timeout: float = 5, routing: Optional[Routing] = None
) -> List[str]:
    """Wait (bounded) until C has no shuttle rule left, nor (given the snapshot from before
    shuttle started) any new fwmark rule or routing table; return what is left, if anything."""
    wait_until(lambda: not leftovers(topo, routing), timeout, interval=0.1)
    return leftovers(topo, routing)


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
        # Never the machine's own /etc/hosts: -H writes here.
        self.hosts_file = topo.fw_dir / "hosts"
        self.policy_file = topo.fw_dir / "firewalld.policy"
        self.firewalld: Optional[Proc] = None
        self.clients: List[Proc] = []
        # C's policy routing before firewalld started: what is new later is shuttle's.
        self.routing_before: Optional[Routing] = None

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
                "--hosts-file",
                str(self.hosts_file),
                "--policy",
                str(self.policy_file),
            ]
        )

    def write_policy(self, text: str) -> None:
        """firewalld's policy file (read at its start): root's, writable by root only."""
        self.policy_file.write_text(text)
        self.policy_file.chmod(0o644)

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
        remote_name: Optional[str] = None,
        user: Optional[LocalUser] = None,
        include_files: Sequence[Path] = (),
        exclude_files: Sequence[Path] = (),
        ssh_cmd: Optional[str] = None,
    ) -> List[str]:
        """shuttle-client's command line (run as user, default the first test user).

        remote is S's address to ssh to (IPv4 or IPv6), remote_name a name to ssh to
        instead (the test gives C an /etc/hosts with it); method None leaves --method out
        (the client's default); the files become -s FILE and -X FILE; ssh_cmd replaces
        the ssh command (-e) with user's key.
        """
        user = user or self.topo.user
        args = [
            self.venv.program("shuttle-client"),
            "-r",
            f"{login or user.name}@{remote_name or url_host(remote)}",
            "-e",
            ssh_cmd or self.topo.ssh_command(user),
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
        """Start shuttle-firewalld as root in C (after a snapshot of C's policy routing)."""
        if self.routing_before is None:
            self.routing_before = routing_state(self.topo)
        proc = self.topo.start("firewalld", self.firewalld_argv())
        self.firewalld = proc
        if not proc.wait_for_line(FIREWALLD_READY, timeout):
            raise StartupError(f"shuttle-firewalld not ready within {timeout}s\n{self.outputs()}")
        return proc

    def start_client(
        self,
        *,
        timeout: float = READY_TIMEOUT,
        env: Optional[Mapping[str, str]] = None,
        **options: Any,
    ) -> Proc:
        """Start shuttle-client as user (default the first test user); wait for ready.

        options are client_args' keywords; env, more environment variables (NOTIFY_SOCKET,
        say). With method given, the ready line must name it ("method nft"), else
        StartupError.
        """
        args = self.client_args(**options)
        user: Optional[LocalUser] = options.get("user")
        method: Optional[str] = options.get("method")
        env = {**self.topo.user_env([str(self.venv.bin)], user=user), **(env or {})}
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

    def leftovers(self) -> List[str]:
        """shuttle's rules in C's firewall, and the fwmark rules and routing tables that C
        did not have before firewalld started."""
        return leftovers(self.topo, self.routing_before)

    def wait_rules_gone(self, timeout: float = 5) -> List[str]:
        """Wait (bounded) until none of self.leftovers() is left; return what is."""
        return wait_rules_gone(self.topo, timeout, routing=self.routing_before)

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

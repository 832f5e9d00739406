"""`make demo`: shuttle end to end in a throw-away namespace network, told step by step.

Builds the network, shows the target is unreachable (IPv4 and IPv6), fetches a page through
shuttle as an unprivileged user in both families, stops shuttle, and checks that nothing is
left behind. Exit code 1 if any step failed.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import textwrap
from typing import List, Optional, Sequence

from testbed.config import (
    C_ADDR,
    C_ADDR6,
    HTTP_PORT,
    S_ADDR6_C,
    S_ADDR6_T,
    S_ADDR_C,
    S_ADDR_T,
    T_ADDR,
    T_ADDR6,
    TARGET_NET,
    TARGET_NET6,
)
from testbed.netns import list_namespaces
from testbed.shuttle import (
    CLIENT_READY,
    FIREWALLD_READY,
    Shuttle,
    StartupError,
    nft_tables,
    ready_method,
    shuttle_rules,
)
from testbed.topology import Topology, curl_argv
from testbed.venv import UserVenv


class Report:
    """Numbered steps, indented details, and a count of what went wrong."""

    def __init__(self) -> None:
        self.number = 0
        self.failures: List[str] = []

    def step(self, text: str) -> None:
        self.number += 1
        print(f"\n{self.number}. {text}", flush=True)

    def say(self, text: str) -> None:
        print(textwrap.indent(text.rstrip(), "   "), flush=True)

    def command(self, where: str, argv: Sequence[str]) -> None:
        self.say(f"[{where}] $ {shlex.join(argv)}")

    def check(self, ok: bool, good: str, bad: str) -> bool:
        if ok:
            self.say(f"OK: {good}")
        else:
            self.say(f"FAILED: {bad}")
            self.failures.append(bad)
        return ok


def first_line(text: str, prefix: str) -> str:
    return next((line for line in text.splitlines() if line.startswith(prefix)), "(none)")


def show_network(report: Report, topo: Topology) -> None:
    report.step("Build the network: three namespaces joined by veth pairs")
    report.say(
        f"client host C ({topo.c.name}): {C_ADDR} {C_ADDR6}, default routes via S\n"
        f"ssh server  S ({topo.s.name}): {S_ADDR_C} {S_ADDR6_C} (sshd) and {S_ADDR_T} "
        f"{S_ADDR6_T}, IP forwarding off\n"
        f"target      T ({topo.t.name}): {T_ADDR} {T_ADDR6}, HTTP on port {HTTP_PORT}, "
        f"echo, bulk\n"
        f"local user {topo.user.name} (uid {topo.user.uid}) with an ed25519 key that S accepts"
    )


def show_unreachable(report: Report, topo: Topology) -> None:
    report.step("Without shuttle, C cannot reach T (S drops the packets: it does not forward)")
    report.say(
        f"Commands 'as {topo.user.name}' run in C through this prefix (root enters the\n"
        f"namespace, setpriv drops to the user, env -i clears root's environment):\n"
        f"  {shlex.join(topo.user_argv([]))}"
    )
    for host in (T_ADDR, T_ADDR6):
        report.command(f"C, as {topo.user.name}", curl_argv(host, HTTP_PORT, 2))
        result = topo.curl(host, HTTP_PORT, max_time=2)
        report.say(f"curl exit code {result.returncode}: {result.stderr.strip()}")
        report.check(
            result.returncode == 28, "timed out, as expected", f"the target {host} was reachable"
        )


def start_shuttle(report: Report, shuttle: Shuttle) -> bool:
    topo = shuttle.topo
    report.step("Start shuttle-firewalld as root in C")
    report.command("root", shuttle.firewalld_argv())  # the argv enters C itself
    firewalld = shuttle.start_firewalld()
    report.say(first_line(firewalld.output(), FIREWALLD_READY))
    subnets = [TARGET_NET, TARGET_NET6]
    report.step(f"Start shuttle-client as {topo.user.name} in C, capturing {' and '.join(subnets)}")
    report.command(f"C, as {topo.user.name}", shuttle.client_args(subnets=subnets))
    client = shuttle.start_client(subnets=subnets)
    report.say(first_line(client.output(), CLIENT_READY))
    method = ready_method(client)
    report.step(
        f"The rules shuttle-firewalld put in C's firewall (method {method}; only this user)"
    )
    rules = shuttle_rules(topo)
    if method == "nft":  # one table per session: show it whole
        for table in nft_tables(topo):
            argv = ["nft", "list", "table", "inet", table]
            report.command("C, root", argv)
            report.say(topo.c.run(argv, timeout=15).stdout)
    else:
        report.command("C, root", ["iptables-save", "-t", "nat"])
        report.command("C, root", ["ip6tables-save", "-t", "nat"])
        report.say("\n".join(rules))
    return report.check(bool(rules), "shuttle's rules are active", "no shuttle rules found")


def fetch_page(report: Report, topo: Topology) -> None:
    for host in (T_ADDR, T_ADDR6):
        report.step(f"Fetch the page from T ({host}) again, now through the tunnel")
        report.command(f"C, as {topo.user.name}", curl_argv(host, HTTP_PORT, 20))
        result = topo.curl(host, HTTP_PORT, max_time=20)
        report.say(f"curl exit code {result.returncode}; the page:")
        report.say(textwrap.indent(result.stdout.strip() or result.stderr.strip(), "| "))
        report.check(
            result.returncode == 0 and topo.marker in result.stdout,
            f"the page arrived with its marker {topo.marker}",
            f"the page from {host} did not arrive through the tunnel",
        )


def show_control(report: Report, shuttle: Shuttle) -> None:
    topo = shuttle.topo
    report.step("Ask the running client how it is, on its control socket (this user only)")
    for command in (["status"], ["connections"]):
        argv = [shuttle.venv.program("shuttle-client"), "ctl", *command]
        report.command(f"C, as {topo.user.name}", argv)
        result = topo.run_as_user(argv)
        report.say(textwrap.indent(result.stdout.strip() or result.stderr.strip(), "| "))
        report.check(result.returncode == 0, f"ctl {command[0]} answered", "ctl failed")


def cut_the_tunnel(report: Report, shuttle: Shuttle) -> None:
    topo = shuttle.topo
    client = shuttle.clients[-1]
    report.step(
        "Cut the tunnel: kill sshd's session in S; the client keeps its rules and reconnects"
    )
    sessions = topo.processes_of(topo.s, topo.user, "sshd")
    report.command("S, root", ["kill", "-KILL", *map(str, sessions)])
    for pid in sessions:
        os.kill(pid, signal.SIGKILL)
    back = client.wait_for_line("shuttle-client: reconnected", 30)
    report.say("\n".join(line for line in client.output().splitlines() if "connect" in line))
    report.check(back, "the client reconnected", "the client did not reconnect")
    result = topo.curl(T_ADDR, HTTP_PORT, max_time=20)
    report.check(
        result.returncode == 0 and topo.marker in result.stdout,
        "the page comes through the new tunnel",
        f"no page after reconnecting: {result.stderr.strip()}",
    )


def stop_shuttle(report: Report, shuttle: Shuttle) -> None:
    report.step("Stop shuttle-client with SIGTERM")
    client = shuttle.clients[-1]
    report.command("root", ["kill", "-TERM", str(client.pid)])
    client.send(signal.SIGTERM)
    code = client.wait(15)
    report.check(code == 0, "it exited with code 0", f"shuttle-client exit code {code}")
    report.command("C, root", ["iptables-save", "-t", "nat"])
    report.command("C, root", ["ip6tables-save", "-t", "nat"])
    report.command("C, root", ["nft", "list", "ruleset"])
    rules = shuttle_rules(shuttle.topo)
    report.check(not rules, "no SHUTTLE rule or table remains", f"rules left: {rules}")
    report.step("Stop shuttle-firewalld with SIGTERM")
    if shuttle.firewalld is not None:
        report.command("root", ["kill", "-TERM", str(shuttle.firewalld.pid)])
        code = shuttle.firewalld.stop(timeout=10)
        report.check(code == 0, "it exited with code 0", f"shuttle-firewalld exit code {code}")


def show_clean(report: Report, topo: Topology) -> None:
    report.step("Check that nothing is left behind")
    ours = [name for name in list_namespaces() if name.startswith(topo.prefix)]
    report.check(not ours, "no namespace of this demo remains", f"namespaces left: {ours}")
    left = topo.leftovers()
    report.check(not left, "no process or file of this demo remains", f"left: {left}")


def run_demo(report: Report) -> None:
    report.step("Build a venv the test user can run, with the four packages installed")
    venv = UserVenv.build()
    try:
        report.say(f"{venv.path}")
        topology: Optional[Topology] = None
        try:
            with Topology.up() as topo:
                topology = topo
                show_network(report, topo)
                show_unreachable(report, topo)
                shuttle = Shuttle(topo, venv)
                try:
                    if start_shuttle(report, shuttle):
                        fetch_page(report, topo)
                        show_control(report, shuttle)
                        cut_the_tunnel(report, shuttle)
                    stop_shuttle(report, shuttle)
                finally:
                    shuttle.stop()
                report.step("Tear down: stop sshd and the servers, delete the namespaces")
        except RuntimeError as exc:  # StartupError, or a teardown that left something
            report.check(False, "", str(exc))
        if topology is not None:
            show_clean(report, topology)
    finally:
        venv.remove()


def main() -> int:
    if os.geteuid() != 0:
        print("The demo needs root (network namespaces, sshd, firewall rules).", file=sys.stderr)
        return 2
    report = Report()
    try:
        run_demo(report)
    except (StartupError, OSError, RuntimeError) as exc:
        report.check(False, "", f"{type(exc).__name__}: {exc}")
    print()
    if report.failures:
        print(f"demo FAILED: {len(report.failures)} step(s) went wrong:")
        for failure in report.failures:
            print(textwrap.indent(failure, "  - "))
        return 1
    print("demo OK: the target was reachable only through shuttle, and everything is cleaned up.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

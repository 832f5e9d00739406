"""The agent path's own rows (issue 17): bulk through the delaying relay at +50 ms each way
(shuttle --tcp=agent beside ssh -L; `python -m bench` has the +20 ms ones), and UDP through
tproxy: iperf3 -u at a few rates through the agent beside the direct path from the ssh server
to the target (the path the agent's datagrams take there), throughput and loss.

Run as root from the repository root (`make bench` does, after bench, bench.rules and
bench.proxies):

    .venv/bin/python -m bench.agentpath [--quick] [--only=relay50,udp] [--json=PATH]

It prints two tables. Every wait is bounded; all traffic stays inside the namespaces. It
reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import servers
from bench.__main__ import raise_fd_limit
from bench.compare import compare
from bench.probes import SLACK, CaseFailed, tool
from bench.report import render, rows
from bench.settings import CIPHER, FULL, QUICK, SSHUTTLE, Settings
from bench.systems import ShuttleAgentPath
from testbed.config import T_ADDR
from testbed.procs import CommandError, Proc
from testbed.shuttle import Shuttle
from testbed.topology import Topology
from testbed.venv import UserVenv

PARTS = ("relay50", "udp")
DELAY_MS = 50.0
RATES_MBIT = (10, 50, 200)  # iperf3 -u -b, megabits per second
DATAGRAM = 1400  # bytes of payload: under the test network's MTU
READY_TIMEOUT = 60.0
FIREWALLD_LEASE = 6


def relay50(quick: bool) -> str:
    """The relay rows at +50 ms each way, through bench.compare (its own network)."""
    settings = Settings(
        systems=("shuttle-agent", "ssh-L"),
        cases=("relay",),
        sizes=QUICK if quick else FULL,
        repeat=1,
        cipher=CIPHER,
        method="nft",
        sshuttle=SSHUTTLE,
        delay_ms=DELAY_MS,
        streams=4,
    )
    outcome = compare(settings)
    table, notes = rows(outcome.figures, settings)
    return render(table, notes)


def udp_figures(report: dict[str, Any]) -> dict[str, Any]:
    """What the receiver got, and the share of datagrams lost, from iperf3 -u -J."""
    if "error" in report:
        raise CaseFailed(f"iperf3: {report['error']}")
    end = report["end"]
    got = end.get("sum_received", end["sum"])
    return {
        "MBps": round(got["bits_per_second"] / 8e6, 2),
        "lost_percent": round(float(end["sum"].get("lost_percent", 0.0)), 2),
    }


def through_shuttle(topo: Topology, rate: int, seconds: int, watch: Proc) -> dict[str, Any]:
    """iperf3 -u as the test user in C: captured by tproxy, carried by the agent."""
    with servers.iperf_server(topo), tool(topo, udp_argv(rate, seconds), watch) as running:
        return udp_figures(running.result(seconds + SLACK))


def direct(topo: Topology, rate: int, seconds: int, _watch: Proc) -> dict[str, Any]:
    """iperf3 -u from S, as root: what the target's network carries without the tunnel."""
    with servers.iperf_server(topo):
        result = topo.s.run(udp_argv(rate, seconds), timeout=seconds + SLACK)
    return udp_figures(json.loads(result.stdout))


def udp_argv(rate: int, seconds: int) -> list[str]:
    return [
        "iperf3",
        "-u",
        "-c",
        T_ADDR,
        "-p",
        str(servers.IPERF_PORT),
        "-b",
        f"{rate}M",
        "-l",
        str(DATAGRAM),
        "-t",
        str(seconds),
        "-J",
    ]


def udp(quick: bool) -> dict[str, dict[int, Any]]:
    """iperf3 -u at each rate: through shuttle (tproxy, the agent's path) as the test user
    in C, and directly from S (root) to the target."""
    seconds = 2 if quick else 5
    results: dict[str, dict[int, Any]] = {"shuttle": {}, "direct": {}}
    venv = UserVenv.build()
    try:
        with Topology.up() as topo:
            shuttle = Shuttle(topo, venv, lease=FIREWALLD_LEASE)
            try:
                shuttle.start_firewalld()
                system = ShuttleAgentPath(topo, CIPHER, shuttle, "tproxy")
                tunnel = system.launch(relay=False, streams=1, excludes=None)
                try:
                    if not tunnel.proc.wait_for_line("shuttle-client: ready", READY_TIMEOUT):
                        raise CaseFailed(f"shuttle did not start: {tunnel.proc.output()[-300:]}")
                    for path, run in (("shuttle", through_shuttle), ("direct", direct)):
                        for rate in RATES_MBIT:
                            results[path][rate] = measured(run, topo, rate, seconds, tunnel.proc)
                finally:
                    tunnel.stop()
            finally:
                shuttle.stop()
    finally:
        venv.remove()
    return results


Run = Callable[[Topology, int, int, Proc], dict[str, Any]]


def measured(run: Run, topo: Topology, rate: int, seconds: int, watch: Proc) -> Any:
    """The figures of one run, or why there are none."""
    try:
        return run(topo, rate, seconds, watch)
    except (CaseFailed, CommandError, ValueError, KeyError) as exc:
        return f"failed: {exc}"[:120]


def udp_table(results: dict[str, dict[int, Any]]) -> str:
    heading = ("iperf3 -u, offered", "shuttle MB/s", "loss", "direct MB/s", "loss")
    lines = ["{:22} {:>13} {:>7} {:>12} {:>7}".format(*heading)]
    for rate in RATES_MBIT:
        cells = []
        for path in ("shuttle", "direct"):
            figure = results[path].get(rate, "-")
            if isinstance(figure, dict):
                cells += [f"{figure['MBps']:.2f}", f"{figure['lost_percent']:.1f}%"]
            else:
                cells += [str(figure)[:40], ""]
        label = f"{rate} Mbit/s ({rate / 8:g} MB/s)"
        lines.append("{:22} {:>13} {:>7} {:>12} {:>7}".format(label, *cells))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.agentpath", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke run")
    parser.add_argument("--only", default=",".join(PARTS), help=",".join(PARTS))
    parser.add_argument("--json", metavar="PATH", help="also write the UDP figures as JSON here")
    args = parser.parse_args()
    parts = [part.strip() for part in args.only.split(",") if part.strip()]
    if not parts or any(part not in PARTS for part in parts):
        parser.error(f"--only: choose from {', '.join(PARTS)}")
    if os.geteuid() != 0:
        print("bench.agentpath: must run as root (namespaces, sshd)", file=sys.stderr)
        return 2
    raise_fd_limit()
    quick = " (--quick)" if args.quick else ""
    if "relay50" in parts:
        table = relay50(args.quick)
        print(f"\nthe agent path through the relay, +{DELAY_MS:g} ms each way{quick}")
        print(table)
    if "udp" in parts:
        results = udp(args.quick)
        print(f"\nUDP through tproxy (the agent's path) beside the direct path from S{quick}")
        print(udp_table(results))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

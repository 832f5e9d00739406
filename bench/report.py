"""The comparison's table: one row per metric, a column per system (shuttle with its default
--tcp=auto, and with --tcp=agent), the ratios of shuttle's two paths to ssh -L and of auto to
sshuttle, and the targets with whether shuttle meets them (auto's from the fast-path issue,
the agent path's from its own); also the machine it ran on.

A cell is a number, "n.a." (the metric does not apply to that system), "-" (not measured) or
"failed [n]", footnote n giving the reason. Meeting a target is reported, never enforced.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.settings import EXTRA_SYSTEMS, Settings

SHUTTLE, SHUTTLE_AGENT, SSH_L, SSHUTTLE = "shuttle", "shuttle-agent", "ssh-L", "sshuttle"
SSH_L_REDIRECT = "ssh-L-redirect"
HEADINGS = {
    SHUTTLE: "auto",
    SHUTTLE_AGENT: "agent",
    SSH_L: "ssh -L",
    SSHUTTLE: "sshuttle",
    SSH_L_REDIRECT: "redirect",
}
# Ratio columns, in the same run: shuttle's default, and its agent path forced, to the others.
RATIOS = (
    (SHUTTLE, SSH_L),
    (SHUTTLE, SSHUTTLE),
    (SHUTTLE_AGENT, SSH_L),
    (SSH_L_REDIRECT, SSH_L),
)
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    text: str
    bound: float
    at_least: bool  # the figure must be >= bound (else <=)
    of_ssh: bool = False  # the bound applies to the system's ratio to ssh -L
    system: str = SHUTTLE  # whose figure: shuttle's default path (auto), or the agent's

    def met(self, figures: dict[str, Any], key: str) -> str:
        value = figures.get(self.system, {}).get(key)
        if isinstance(value, str) and value.startswith("failed"):
            return "NO"
        if self.of_ssh:
            value = ratio(value, figures.get(SSH_L, {}).get(key))
        if not isinstance(value, (int, float)):
            return "?"
        return "yes" if (value >= self.bound if self.at_least else value <= self.bound) else "NO"


@dataclass(frozen=True)
class Metric:
    key: str
    case: str
    label: str  # str.format fields: the sizes and settings that name the row
    unit: str
    digits: int
    targets: tuple[Target, ...] = ()
    ratios: bool = True  # not for a difference, which may be zero or negative


def at_least_of_ssh(bound: float, system: str = SHUTTLE) -> Target:
    return Target(f"≥ {bound:g}x ssh -L", bound, at_least=True, of_ssh=True, system=system)


def at_most_of_ssh(bound: float, system: str = SHUTTLE) -> Target:
    return Target(f"≤ {bound:g}x ssh -L", bound, at_least=False, of_ssh=True, system=system)


# The targets of the fast-path issue (auto) and of the agent-path issue (agent), as ratios
# to ssh -L in the same run where they are stated so.
BULK = (at_least_of_ssh(0.95), at_least_of_ssh(0.6, SHUTTLE_AGENT))
RTT_IDLE = (at_most_of_ssh(1.1),)
RTT_DURING_UPLOAD = (at_most_of_ssh(1.0),)
RTT_UNDER_LOAD = (Target("≤ 3x idle", 3.0, at_least=False, system=SHUTTLE_AGENT),)
MANY_CONNS = (Target("≤ 10, all echo", 10, at_least=False),)
RATE = (at_least_of_ssh(0.9),)
FIRST_BYTE = (Target("≤ 500", 500, at_least=False),)
EXCLUDES_COST = (Target("≤ 1,000", 1000, at_least=False),)
RSS = (Target("≤ 64", 64, at_least=False),)
RELAY = (at_least_of_ssh(0.95), at_least_of_ssh(0.8, SHUTTLE_AGENT))
METRICS = (
    Metric("bulk_up", "bulk", "bulk upload, iperf3 {bulk} s", "MB/s", 1, BULK),
    Metric("bulk_down", "bulk", "bulk download, iperf3 {bulk} s", "MB/s", 1, BULK),
    Metric("rtt_idle_median", "rtt", "echo RTT idle, median", "µs", 0, RTT_IDLE),
    Metric("rtt_idle_p99", "rtt", "echo RTT idle, p99", "µs", 0),
    Metric("rtt_bulk_median", "rtt", "echo RTT during upload, median", "µs", 0, RTT_DURING_UPLOAD),
    Metric("rtt_bulk_ratio", "rtt", "  RTT during upload / idle", "x", 2, RTT_UNDER_LOAD),
    Metric("conns_small", "conns", "{small} simultaneous conns echo", "s", 2),
    Metric("conns_big", "conns", "{big} simultaneous conns echo", "s", 2, MANY_CONNS),
    Metric("rate", "rate", "sequential connect-echo-close", "conn/s", 0, RATE),
    Metric("first_byte", "start", "start to first echo", "ms", 0, FIRST_BYTE),
    Metric("first_byte_excl", "start", "start to first echo, {excludes} excludes", "ms", 0),
    Metric("start_excl_added", "start", "  {excludes} excludes add", "ms", 0, EXCLUDES_COST, False),
    Metric("stop", "start", "stop: SIGTERM to exit and rules gone", "ms", 0),
    Metric("stop_excl", "start", "stop, {excludes} excludes", "ms", 0),
    Metric("stop_excl_added", "start", "  {excludes} excludes add", "ms", 0, EXCLUDES_COST, False),
    Metric("rss_started", "rss", "client RSS after start", "MiB", 1),
    Metric("rss_hold", "rss", "client RSS, {hold} idle conns", "MiB", 1, RSS),
    Metric("rss_hold_tree", "rss", "  with its child processes", "MiB", 1),
    Metric("relay_up_one", "relay", "relay +{delay} ms each way: up, 1 conn", "MB/s", 1, RELAY),
    Metric("relay_up_parallel", "relay", "  {streams} conns", "MB/s", 1, RELAY),
    Metric("relay_up_streams", "relay", "  {streams} conns, --streams {streams}", "MB/s", 1),
    Metric("relay_down_one", "relay", "relay +{delay} ms each way: down, 1 conn", "MB/s", 1, RELAY),
    Metric("relay_down_parallel", "relay", "  {streams} conns", "MB/s", 1, RELAY),
    Metric("relay_down_streams", "relay", "  {streams} conns, --streams {streams}", "MB/s", 1),
    Metric("relay_rtt_idle", "relay", "relay +{delay} ms each way: echo RTT idle", "µs", 0),
    Metric("relay_rtt_bulk", "relay", "  during upload, median", "µs", 0),
)


def metrics_of(case: str) -> list[str]:
    return [metric.key for metric in METRICS if metric.case == case]


def ratio(value: object, base: object) -> float | None:
    if isinstance(value, (int, float)) and isinstance(base, (int, float)) and base:
        return value / base
    return None


def label(metric: Metric, settings: Settings) -> str:
    sizes = settings.sizes
    return metric.label.format(
        bulk=sizes.bulk_seconds,
        small=f"{sizes.conns[0]:,}",
        big=f"{sizes.conns[1]:,}",
        hold=f"{sizes.hold:,}",
        excludes=f"{sizes.excludes:,}",
        delay=f"{settings.delay_ms:g}",
        streams=settings.streams,
    )


def rows(
    figures: dict[str, dict[str, Any]], settings: Settings
) -> tuple[list[dict[str, str]], list[str]]:
    """The table's rows (column heading -> cell) and its footnotes."""
    notes: list[str] = []
    table = []
    # An extra system's column only when it was asked for.
    columns = [s for s in HEADINGS if s not in EXTRA_SYSTEMS or s in settings.systems]
    for metric in METRICS:
        if metric.case not in settings.cases:
            continue
        row = {"metric": label(metric, settings), "unit": metric.unit}
        for system in columns:
            heading = HEADINGS[system]
            value = figures.get(system, {}).get(metric.key, "-")
            if isinstance(value, str) and value.startswith("failed: "):
                note = f"{heading}: {value.removeprefix('failed: ')}"
                if note not in notes:  # one failure often empties several cells
                    notes.append(note)
                value = f"failed [{notes.index(note) + 1}]"
            row[heading] = value if isinstance(value, str) else f"{value:,.{metric.digits}f}"
        for system, base in RATIOS:
            if system not in columns:
                continue
            share = ratio(
                figures.get(system, {}).get(metric.key), figures.get(base, {}).get(metric.key)
            )
            shown = share is not None and metric.ratios
            row[f"{HEADINGS[system]}/{HEADINGS[base]}"] = f"{share:.3g}x" if shown else ""
        row["target"] = "; ".join(f"{HEADINGS[t.system]} {t.text}" for t in metric.targets)
        row["met"] = "; ".join(
            f"{HEADINGS[t.system]} {t.met(figures, metric.key)}" for t in metric.targets
        )
        table.append(row)
    return table, notes


def render(table: list[dict[str, str]], notes: list[str]) -> str:
    if not table:
        return "(nothing measured)"
    headings = list(table[0])
    widths = {h: max(len(h), *(len(row[h]) for row in table)) for h in headings}
    left = ("metric", "unit", "target", "met")

    def line(cells: dict[str, str]) -> str:
        return "  ".join(
            cells[h].ljust(widths[h]) if h in left else cells[h].rjust(widths[h]) for h in headings
        ).rstrip()

    header = line({h: h for h in headings})
    lines = [header, "-" * len(header), *(line(row) for row in table)]
    lines += [f"[{number}] {note}" for number, note in enumerate(notes, 1)]
    return "\n".join(lines)


def first_line(argv: list[str]) -> str:
    """The first line a version command prints (ssh -V prints on stderr)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        return f"unknown ({exc.strerror})"
    return next(iter((done.stdout + done.stderr).splitlines()), "unknown").strip()


def machine(settings: Settings, versions: dict[str, str]) -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "fd limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "python (bench)": sys.version.split()[0],
        "python (tools, agent)": first_line(["/usr/bin/python3", "--version"]),
        "ssh": first_line(["ssh", "-V"]),
        "cipher": settings.cipher,
        "iperf3": first_line(["iperf3", "--version"]),
        "shuttle": first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
        **versions,
    }

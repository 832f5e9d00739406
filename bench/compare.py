"""The comparison's run: one namespace network with the bench's servers, then every chosen case
on each system (each run --repeat times, medians kept); the figures and raw results for the
report. A system that cannot start, or a case that fails, fills its cells with the reason;
only a network that cannot be built stops the run.

The systems take turns within each case, one tunnel up at a time, and the order turns with
each case and each repeat: whichever went first did worse (an echo round trip 1.11x ssh -L's
with shuttle first, 1.02x with ssh -L first, the same code), so no system is always first.
Each turn starts a new tunnel: one that had 10,000 connections at once may still carry what
is left of them (ssh -L holds the thousands it failed), and the sequential rate on it gave
ssh -L 873 /s against 2,100-2,500 on a new one.
After each turn C's conntrack table is emptied, so that no system inherits the NAT of the
connections another left closing (bench/conntrack.py)."""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import servers
from bench.cases import CASES, Figures, Subject, failed
from bench.probes import EPHEMERAL_PORTS, CaseFailed, Probe
from bench.report import SHUTTLE, SHUTTLE_AGENT, SSH_L, SSH_L_REDIRECT, SSHUTTLE, metrics_of
from bench.rules import hosts
from bench.settings import Settings
from bench.systems import (
    ShuttleAgentPath,
    ShuttleClient,
    SshForward,
    SshForwardRedirected,
    Sshuttle,
    SshuttleVenv,
    System,
)
from testbed.procs import CommandError
from testbed.shuttle import Shuttle, StartupError
from testbed.topology import Topology
from testbed.venv import UserVenv

FIREWALLD_LEASE = 6  # shuttle-firewalld's default (the tests use a shorter one)
CONNTRACK = Path(__file__).with_name("conntrack.py")


@dataclass
class Outcome:
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)  # system -> metric -> value
    details: dict[str, dict[str, list[Figures]]] = field(default_factory=dict)  # system, case
    versions: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what went wrong around the figures


BEGAN = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - BEGAN:4.0f} s] {text}", file=sys.stderr, flush=True)


def tune(topo: Topology) -> None:
    """Room for the rate case's tens of thousands of short connections: more ephemeral ports
    (those below stay the first-byte tool's), and reuse of TIME_WAIT ones, in C (the load
    tool) and S (agent, sshd)."""
    for ns in (topo.c, topo.s):
        ns.sysctl("net.ipv4.ip_local_port_range", "{} {}".format(*EPHEMERAL_PORTS))
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")


def exclude_file(topo: Topology, count: int) -> Path:
    """count /32s outside the target network (bench.rules' set), one per line."""
    text = "".join(f"{network}\n" for network, *_ports in hosts(count))
    return topo.write_user_file("bench-excludes.txt", text)


def run_case(case: str, subject: Subject) -> Figures:
    try:
        return CASES[case](subject)
    except CaseFailed as exc:
        return {"error": str(exc)}
    except (CommandError, OSError, KeyError, ValueError) as exc:  # a bench bug: show it
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}


def combine(case: str, runs: list[Figures]) -> dict[str, Any]:
    """Each metric of case over the runs: the median of the numbers, else the first text."""
    combined: dict[str, Any] = {}
    for key in metrics_of(case):
        values = [run.get(key, failed(run.get("error", "not measured"))) for run in runs]
        numbers = [value for value in values if isinstance(value, (int, float))]
        combined[key] = statistics.median(numbers) if numbers else values[0]
    return combined


def measure(topo: Topology, subjects: list[Subject], settings: Settings, outcome: Outcome) -> None:
    """Every chosen case on every subject, taking turns (see above)."""
    cases = [case for case in CASES if case in settings.cases]
    for index, case in enumerate(cases):
        runs: dict[str, list[Figures]] = {subject.system.name: [] for subject in subjects}
        for number in range(settings.repeat):
            count = f" ({number + 1}/{settings.repeat})" if settings.repeat > 1 else ""
            for subject in turn(subjects, index + number):
                name = subject.system.name
                say(f"{name}: {case}{count}")
                try:
                    runs[name].append(run_case(case, subject))
                finally:
                    release(subject, outcome)
                    forget_connections(topo, outcome)
        for subject in subjects:
            name = subject.system.name
            figures = outcome.figures.setdefault(name, {})
            figures.update(combine(case, runs[name]))
            outcome.details.setdefault(name, {})[case] = runs[name]
            say(f"  {name}: " + ", ".join(f"{key} {figures[key]}" for key in metrics_of(case)))


def turn(subjects: list[Subject], shift: int) -> list[Subject]:
    """The subjects in their order, rotated by shift."""
    if not subjects:
        return []
    shift %= len(subjects)
    return subjects[shift:] + subjects[:shift]


def forget_connections(topo: Topology, outcome: Outcome) -> None:
    """Empty C's conntrack table (bench/conntrack.py says why)."""
    done = topo.c.run([sys.executable, str(CONNTRACK)], timeout=30)
    if done.returncode:
        outcome.problems.append(f"conntrack flush in C: {done.stderr.strip()[:200]}")


def release(subject: Subject, outcome: Outcome) -> None:
    """Stop the subject's tunnel: the next system captures the same network."""
    try:
        subject.release()
    except CaseFailed as exc:
        outcome.problems.append(f"{subject.system.name}: stopping its tunnel: {exc}")


def unavailable(name: str, reason: str, settings: Settings, outcome: Outcome) -> None:
    say(f"{name}: {reason}")
    outcome.figures[name] = {
        key: failed(reason) for case in settings.cases for key in metrics_of(case)
    }


def systems(
    topo: Topology, settings: Settings, shuttle: Shuttle, sshuttle: SshuttleVenv | None
) -> dict[str, System | str]:
    """The systems to measure, or why one cannot be."""
    found: dict[str, System | str] = {}
    clients = {SHUTTLE: ShuttleClient, SHUTTLE_AGENT: ShuttleAgentPath}
    for name in settings.systems:
        if name in clients:
            try:
                if shuttle.firewalld is None:  # one firewalld serves both of shuttle's paths
                    shuttle.start_firewalld()
                found[name] = clients[name](topo, settings.cipher, shuttle, settings.method)
            except StartupError as exc:
                found[name] = f"shuttle-firewalld did not start: {str(exc)[:200]}"
        elif name == SSH_L:
            found[name] = SshForward(topo, settings.cipher)
        elif name == SSH_L_REDIRECT:
            found[name] = SshForwardRedirected(topo, settings.cipher)
        elif name == SSHUTTLE:
            found[name] = (
                Sshuttle(topo, settings.cipher, sshuttle.program)
                if sshuttle
                else f"pip install {settings.sshuttle} failed"
            )
    return found


def in_network(
    topo: Topology,
    settings: Settings,
    venv: UserVenv,
    sshuttle: SshuttleVenv | None,
    outcome: Outcome,
) -> None:
    tune(topo)
    tools = servers.install(topo)
    servers.start_echo(topo, tools)
    if "relay" in settings.cases:
        servers.start_relay(topo, tools, settings.delay_ms)
    probe = Probe(topo, tools)
    excludes = exclude_file(topo, settings.sizes.excludes)
    shuttle = Shuttle(topo, venv, lease=FIREWALLD_LEASE)
    try:
        subjects = []
        for name, system in systems(topo, settings, shuttle, sshuttle).items():
            if isinstance(system, str):
                unavailable(name, system, settings, outcome)
            else:
                subjects.append(Subject(system, probe, settings, excludes))
        measure(topo, subjects, settings, outcome)
    finally:
        outcome.problems += shuttle.stop()


def compare(settings: Settings) -> Outcome:
    outcome = Outcome()
    say("building a venv of shuttle the test user can run (copies of the packages as they are)")
    venv = UserVenv.build()
    sshuttle = None
    try:
        if SSHUTTLE in settings.systems:
            say(f"installing {settings.sshuttle} into a venv of its own")
            try:
                sshuttle = SshuttleVenv(settings.sshuttle)
                outcome.versions["sshuttle"] = sshuttle.version()
            except CommandError as exc:
                outcome.problems.append(f"pip install {settings.sshuttle}: {exc}")
        say("building the namespace network")
        try:
            with Topology.up() as topo:
                in_network(topo, settings, venv, sshuttle, outcome)
        except RuntimeError as exc:  # the teardown's complaint comes after the figures
            if not outcome.figures:
                raise
            outcome.problems.append(str(exc))
    finally:
        venv.remove()
        if sshuttle is not None:
            sshuttle.remove()
    return outcome

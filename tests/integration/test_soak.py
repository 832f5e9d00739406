"""Soak: connection churn and bulk transfers through one client for a bounded time, while the
client's and the agent's open descriptors and resident memory are sampled.

Marked slow (`pytest -m slow`; `make test` leaves it out). SHUTTLE_SOAK_SECONDS sets the
load's duration (default 600), SHUTTLE_SOAK_INTERVAL the sampling interval (default 5 s),
SHUTTLE_SOAK_LOAD runs "churn" or "bulk" alone, SHUTTLE_SOAK_OUT names a CSV file for the
samples (a JSON summary goes beside it, same name with .json); docs/soak.md shows how to
read them (python -m tests.integration.soak_report FILE).

The load, in two threads until the deadline: sequential connect-echo-close (bench's
loadtool `rate`, 10 s at a time) alternating with 100 simultaneous connections echoing 4 KiB
(`conns`); and 16 MiB transfers, up then down, compared by sha256 (tcptool). Asserted:
every echo and every transfer correct; the same agent throughout; once the load stopped and
its connections closed, both processes' descriptors back to the baseline (plus FD_SLACK);
and resident memory in the second half of the load no higher than in the first half plus
RSS_GROWTH_KIB. No timings are asserted: how fast the load goes is the bench's business.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from testbed import BULK_PORT, ECHO_PORT, SYSTEM_PYTHON, T_ADDR, Shuttle, Topology
from testbed.procs import wait_until

from .procwatch import agent_pid, agent_pids, install_tool, usage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SOAK_SECONDS = float(os.environ.get("SHUTTLE_SOAK_SECONDS", "600"))
SAMPLE_EVERY = float(os.environ.get("SHUTTLE_SOAK_INTERVAL", "5"))
# Which load threads run: "churn", "bulk" or both (the default), to tell their effects apart.
SOAK_LOAD = os.environ.get("SHUTTLE_SOAK_LOAD", "churn,bulk").split(",")
CHURN_SECONDS = 10.0  # one loadtool `rate` run
BURST = 100  # simultaneous connections of one loadtool `conns` run
BULK_BYTES = 16 * 1024 * 1024  # one transfer, each way in turn
# Descriptors the processes may hold beyond their baseline once the load is gone: none is
# expected; a few for whatever asyncio or zmq open lazily. A leaked socket per connection
# would be thousands.
FD_SLACK = 4
SETTLE_SECONDS = 60.0  # at most, for the last connections to close on both sides
# Resident memory may grow between the first half of the load and the second by at most
# this, in KiB. The load is the same in both halves, and everything the relay holds is
# bounded by the flow control (1 MiB credit window per channel and direction, 512 KiB in
# flight, 512 KiB in the pipe's write buffer, at most BURST + 2 connections at once), so
# the first half already reaches the peak; what is left is the allocator's noise (a few
# MiB: the first runs moved by under 2 MiB). A leak of 100 bytes per connection would
# add about 10 MiB per half of a 10-minute run (about 100,000 connections per half).
RSS_GROWTH_KIB = 8 * 1024


@dataclass
class Sample:
    """One reading of both processes, and how much load had been done by then."""

    t: float  # seconds since the load started
    phase: str  # "baseline", "load" or "after"
    client_fds: int
    client_rss_kib: int
    agent_fds: int
    agent_rss_kib: int
    connections: int
    bulk_bytes: int


@dataclass
class Load:
    """What the load threads did and what went wrong; shared with them under lock."""

    connections: int = 0
    bulk_bytes: int = 0
    runs: int = 0
    errors: List[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, connections: int = 0, bulk_bytes: int = 0) -> None:
        with self.lock:
            self.connections += connections
            self.bulk_bytes += bulk_bytes
            self.runs += 1

    def fail(self, text: str) -> None:
        with self.lock:
            self.errors.append(text[:2000])


def loadtool(topo: Topology, path: Path, *args: str, timeout: float) -> Dict[str, Any]:
    """Run bench's loadtool as the test user in C; its JSON result (or why there is none)."""
    argv = [SYSTEM_PYTHON, str(path), *args, "--timeout", str(timeout)]
    result = topo.run_as_user(argv, timeout=timeout + 30)
    lines = result.stdout.strip().splitlines()
    try:
        parsed: Dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        parsed = {"ok": False, "error": f"exit {result.returncode}: {result.stderr[-1000:]}"}
    return parsed


def churn(topo: Topology, tool: Path, deadline: float, load: Load) -> None:
    """Sequential connect-echo-close, then a burst of simultaneous ones, until the deadline."""
    for turn in range(int(SOAK_SECONDS / CHURN_SECONDS) * 2 + 4):  # bounded in count
        left = deadline - time.monotonic()
        if left <= 1 or load.errors:
            return
        seconds = f"{min(CHURN_SECONDS, left):.1f}"
        sequential = ("rate", T_ADDR, str(ECHO_PORT), "--seconds", seconds, "--size", "256")
        rate = loadtool(topo, tool, *sequential, timeout=CHURN_SECONDS + 30)
        if not rate.get("ok"):
            load.fail(f"churn {turn}, sequential: {rate}")
            return
        load.count(connections=int(rate["connections"]))
        at_once = ("conns", T_ADDR, str(ECHO_PORT), str(BURST), "--size", "4096")
        burst = loadtool(topo, tool, *at_once, timeout=60)
        if not burst.get("ok") or burst.get("good") != BURST:
            load.fail(f"churn {turn}, {BURST} at once: {burst}")
            return
        load.count(connections=BURST)


def bulk(topo: Topology, deadline: float, load: Load) -> None:
    """BULK_BYTES up, then down, each checked by sha256, until the deadline."""
    # Bounded in count too: a transfer (a python start, a connection) takes over 10 ms.
    for turn in range(int(SOAK_SECONDS * 100) + 4):
        if time.monotonic() >= deadline or load.errors:
            return
        direction = ("up", "down")[turn % 2]
        args = (direction, T_ADDR, str(BULK_PORT), str(BULK_BYTES), f"soak-{turn}")
        result = topo.tcptool(*args, timeout=120)
        if not result.get("ok") or result.get("bytes") != BULK_BYTES:
            load.fail(f"bulk {turn} ({direction}): {result}")
            return
        load.count(bulk_bytes=BULK_BYTES)


def guarded(name: str, work: Callable[[], None], load: Load) -> threading.Thread:
    def run() -> None:
        try:
            work()
        except Exception as exc:  # reported by the test, not lost in the thread
            load.fail(f"{name}: {exc!r}")

    return threading.Thread(target=run, name=name, daemon=True)


def sample(client: int, agent: int, phase: str, started: float, load: Load) -> Sample:
    c, a = usage(client), usage(agent)
    with load.lock:
        done = (load.connections, load.bulk_bytes)
    t = round(time.monotonic() - started, 1)
    return Sample(t, phase, c.fds, c.rss_kib, a.fds, a.rss_kib, *done)


def write_samples(path: Path, samples: List[Sample], summary: Dict[str, Any]) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(asdict(samples[0])))
        writer.writeheader()
        for row in samples:
            writer.writerow(asdict(row))
    path.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")


def halves(samples: List[Sample], key: str) -> Tuple[int, int]:
    """The largest value of key in the first and in the second half of the load's samples."""
    during = [s for s in samples if s.phase == "load"] or samples[:1]
    middle = during[-1].t / 2
    first = [getattr(s, key) for s in during if s.t <= middle]
    second = [getattr(s, key) for s in during if s.t > middle]
    return max(first), max(second or first)


def test_soak_churn_and_bulk_keep_descriptors_and_memory_flat(
    shuttle: Shuttle, tmp_path: Path
) -> None:
    topo = shuttle.topo
    tool = install_tool(topo, REPO / "bench" / "loadtool.py")
    client = shuttle.start_client().pid
    agent = agent_pid(topo)
    load = Load()
    # Warm up: every kind of connection and transfer once, so the baseline has what the
    # processes keep for good (asyncio's and zmq's own descriptors, the first buffers).
    warm = loadtool(topo, tool, "conns", T_ADDR, str(ECHO_PORT), str(BURST), timeout=60)
    assert warm.get("ok"), f"{warm}\n{shuttle.outputs()}"
    for direction in ("up", "down"):
        result = topo.tcptool(direction, T_ADDR, str(BULK_PORT), "1048576", "warm", timeout=60)
        assert result["ok"], f"{result}\n{shuttle.outputs()}"
    started = time.monotonic()
    baseline = sample(client, agent, "baseline", started, load)
    samples = [baseline]
    deadline = started + SOAK_SECONDS
    work = {
        "churn": lambda: churn(topo, tool, deadline, load),
        "bulk": lambda: bulk(topo, deadline, load),
    }
    assert set(SOAK_LOAD) <= set(work), f"SHUTTLE_SOAK_LOAD: {SOAK_LOAD}, not in {set(work)}"
    threads = [guarded(name, work[name], load) for name in SOAK_LOAD]
    for thread in threads:
        thread.start()
    for _ in range(int(SOAK_SECONDS / SAMPLE_EVERY) + 2):  # bounded in count and time
        if time.monotonic() >= deadline or not any(t.is_alive() for t in threads):
            break
        time.sleep(min(SAMPLE_EVERY, max(0.0, deadline - time.monotonic())))
        samples.append(sample(client, agent, "load", started, load))
    for thread in threads:
        thread.join(timeout=180)  # a run in progress finishes within its own timeout
    assert not any(t.is_alive() for t in threads), "a load thread did not finish"
    after: List[Sample] = []

    def settled() -> bool:
        after.append(sample(client, agent, "after", started, load))
        last = after[-1]
        return (
            last.client_fds <= baseline.client_fds + FD_SLACK
            and last.agent_fds <= baseline.agent_fds + FD_SLACK
        )

    wait_until(settled, SETTLE_SECONDS, interval=1.0)
    samples += after
    rss_halves = {who: halves(samples, f"{who}_rss_kib") for who in ("client", "agent")}
    summary: Dict[str, Any] = {
        "seconds": SOAK_SECONDS,
        "sample_every": SAMPLE_EVERY,
        "load": SOAK_LOAD,
        "connections": load.connections,
        "bulk_bytes": load.bulk_bytes,
        "runs": load.runs,
        "errors": load.errors,
        "baseline": asdict(baseline),
        "last": asdict(samples[-1]),
        "rss_max_halves_kib": rss_halves,
        "fds_max_during": {
            "client": max(s.client_fds for s in samples),
            "agent": max(s.agent_fds for s in samples),
        },
        "bounds": {"fd_slack": FD_SLACK, "rss_growth_kib": RSS_GROWTH_KIB},
    }
    out: Optional[str] = os.environ.get("SHUTTLE_SOAK_OUT")
    path = Path(out) if out else tmp_path / "soak.csv"
    write_samples(path, samples, summary)
    print(f"soak samples: {path} (summary: {path.with_suffix('.json')})")
    print(json.dumps({k: v for k, v in summary.items() if k != "errors"}))

    assert not load.errors, "\n".join(load.errors) + "\n" + shuttle.outputs()
    assert load.runs > 0, summary
    assert agent_pids(topo) == [agent], "the agent changed: the tunnel was lost on the way"
    last = samples[-1]
    assert last.client_fds <= baseline.client_fds + FD_SLACK, (
        f"client descriptors {baseline.client_fds} -> {last.client_fds} after the load"
    )
    assert last.agent_fds <= baseline.agent_fds + FD_SLACK, (
        f"agent descriptors {baseline.agent_fds} -> {last.agent_fds} after the load"
    )
    for who in ("client", "agent"):
        first, second = rss_halves[who]
        assert second - first <= RSS_GROWTH_KIB, (
            f"{who}'s RSS peak grew from {first} KiB in the first half of the load to "
            f"{second} KiB in the second (bound: +{RSS_GROWTH_KIB} KiB)"
        )

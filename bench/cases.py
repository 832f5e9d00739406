"""The measurements, one function per case, each for one system (the Subject).

A case returns its figures under the metric keys of bench.report (a number, or a "failed:
..." or "n.a." text), with its raw results under "details". bulk, rtt, conns and rate use the
subject's shared tunnel; start, rss and relay start tunnels of their own, with the shared one
stopped (two shuttle sessions would capture the same traffic, two ssh -L the same ports).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import processes
from bench.probes import CaseFailed, Probe
from bench.settings import Settings
from bench.systems import System, Tunnel

Figures = dict[str, Any]
SETTLE = 1.0  # seconds for a tunnel's buffers to fill (during upload) or drain (idle)
NOT_APPLICABLE = "n.a."
QUIET_STOP_TIMEOUT = 10.0  # a tunnel that failed need not be waited for as long
SERIES_BUDGET = 30.0  # seconds: a start series stops repeating once it has taken this long


def failed(reason: object) -> str:
    return f"failed: {reason}"


@dataclass
class Subject:
    """One system under test in one network, and its shared tunnel: started when a case
    first needs it, and again if a case killed it."""

    system: System
    probe: Probe
    settings: Settings
    excludes: Path  # the exclude file of the start case
    shared: Tunnel | None = None

    def tunnel(self) -> Tunnel:
        if self.shared is None or not self.shared.alive():
            self.release()
            self.shared, _took = self.start()
        return self.shared

    def release(self) -> None:
        """Stop the shared tunnel, if any."""
        if self.shared is not None:
            shared, self.shared = self.shared, None
            if shared.alive():
                shared.stop()
            else:
                shared.proc.stop(timeout=5)

    def start(
        self, *, relay: bool = False, streams: int = 1, excludes: Path | None = None
    ) -> tuple[Tunnel, float]:
        """A new tunnel, and the seconds from its start to the first echo through it."""
        timeout = self.settings.sizes.start_timeout
        with self.probe.first_byte(self.system.echo, timeout) as measure:
            since = time.time()
            tunnel = self.system.launch(relay=relay, streams=streams, excludes=excludes)
            try:
                return tunnel, measure(since, tunnel.proc)
            except CaseFailed:
                stop_quietly(tunnel)
                raise


def stop_quietly(tunnel: Tunnel) -> None:
    """Stop a tunnel whose stop is not being measured (its failure is not the figure)."""
    try:
        tunnel.stop(QUIET_STOP_TIMEOUT)
    except CaseFailed as exc:
        print(f"  (stopping it: {exc})", file=sys.stderr, flush=True)


def bulk(subject: Subject) -> Figures:
    figures: Figures = {"details": {}}
    for key, reverse in (("bulk_up", False), ("bulk_down", True)):
        tunnel = subject.tunnel()
        seconds = subject.settings.sizes.bulk_seconds
        try:
            result = subject.probe.iperf(
                subject.system.iperf, seconds, reverse=reverse, watch=tunnel.proc
            )
            figures[key] = result["MBps"]
            figures["details"][key] = result
        except CaseFailed as exc:
            figures[key] = failed(exc)
    return figures


def rtt(subject: Subject) -> Figures:
    idle = echoes(subject, subject.tunnel())
    figures: Figures = {
        "rtt_idle_median": idle["median_us"],
        "rtt_idle_p99": idle["p99_us"],
        "details": {"idle": idle},
    }
    try:
        busy, figures["details"]["upload"] = echoes_during_upload(subject, subject.tunnel())
    except CaseFailed as exc:
        figures["rtt_bulk_median"] = figures["rtt_bulk_ratio"] = failed(exc)
        return figures
    figures["details"]["during_upload"] = busy
    figures["rtt_bulk_median"] = busy["median_us"]
    figures["rtt_bulk_ratio"] = round(busy["median_us"] / idle["median_us"], 2)
    return figures


def echoes(subject: Subject, tunnel: Tunnel) -> dict[str, Any]:
    """Round trips of small echoes through the tunnel (loadtool rtt's figures); CaseFailed
    if they could not be timed (a refused connection, say)."""
    sizes = subject.settings.sizes
    args = ("--count", sizes.rtt_echoes, "--seconds", sizes.rtt_seconds)
    result = subject.probe.loadtool(
        "rtt", subject.system.echo, *args, timeout=sizes.rtt_seconds + 10, watch=tunnel.proc
    )
    if not result.get("ok"):
        raise CaseFailed(f"echoes: {result.get('error', 'no figures')}")
    return result


def echoes_during_upload(subject: Subject, tunnel: Tunnel) -> tuple[dict[str, Any], dict[str, Any]]:
    """echoes() while an iperf3 upload runs through the same tunnel, and the upload's figures."""
    upload_seconds = SETTLE + subject.settings.sizes.rtt_seconds + SETTLE  # outlasts the echoes
    with subject.probe.upload(subject.system.iperf, upload_seconds, tunnel.proc) as done:
        time.sleep(SETTLE)
        busy = echoes(subject, tunnel)
        return busy, done()


def conns(subject: Subject) -> Figures:
    figures: Figures = {"details": {}}
    timeout = subject.settings.sizes.conns_timeout
    small, big = subject.settings.sizes.conns
    for key, count in (("conns_small", small), ("conns_big", big)):
        if isinstance(figures.get("conns_small"), str):
            figures[key] = failed(f"not tried: {small:,} failed already")
            continue
        tunnel = subject.tunnel()
        try:
            result = subject.probe.loadtool(
                "conns", subject.system.echo, count, timeout=timeout, watch=tunnel.proc
            )
        except CaseFailed as exc:
            figures[key] = failed(exc)
            continue
        figures["details"][key] = result
        figures[key] = result["seconds"] if result["ok"] else failed(shortfall(result))
    return figures


def shortfall(result: dict[str, Any]) -> str:
    """What the load tool's conns or hold did not get done, and its first error."""
    first = (result.get("errors") or ["?"])[0]
    return (
        f"of {result['connections']:,}, {result['opened']:,} connected and {result['good']:,}"
        f" echoed in {result['seconds']:g} s ({first})"
    )


def rate(subject: Subject) -> Figures:
    tunnel = subject.tunnel()
    seconds = subject.settings.sizes.rate_seconds
    result = subject.probe.loadtool(
        "rate", subject.system.echo, "--seconds", seconds, timeout=seconds + 10, watch=tunnel.proc
    )
    if result["ok"]:
        figure: float | str = result["per_second"]
    else:
        errors = result["errors"]
        figure = failed(f"{len(errors)} errors after {result['connections']:,}: {errors[0]}")
    return {"rate": figure, "details": result}


def start(subject: Subject) -> Figures:
    """Start to first echo and stop, without and with the exclude file: medians of a few
    starts each (one start is one sample), as many as fit in SERIES_BUDGET (sshuttle takes
    long with the excludes). A failed start is not tried again."""
    subject.release()
    plain = start_stop_series(subject, None)
    figures: Figures = {
        "first_byte": plain["first_byte"],
        "stop": plain["stop"],
        "details": {"plain": plain},
    }
    if not subject.system.takes_excludes:
        for key in ("first_byte_excl", "start_excl_added", "stop_excl", "stop_excl_added"):
            figures[key] = NOT_APPLICABLE
        return figures
    excluded = start_stop_series(subject, subject.excludes)
    figures["details"]["excludes"] = excluded
    for key, added in (("first_byte", "start_excl_added"), ("stop", "stop_excl_added")):
        with_file = excluded[key]
        figures[f"{key}_excl"] = with_file
        figures[added] = difference(with_file, plain[key])
    return figures


def start_stop_series(subject: Subject, excludes: Path | None) -> Figures:
    firsts: list[float] = []
    stops: list[float] = []
    errors: list[str] = []
    began = time.monotonic()
    for _ in range(subject.settings.sizes.starts):
        if firsts and time.monotonic() - began > SERIES_BUDGET:
            break
        try:
            tunnel, first = subject.start(excludes=excludes)
            firsts.append(first * 1000)
            stops.append(tunnel.stop() * 1000)
        except CaseFailed as exc:
            errors.append(str(exc))
            break
    reason = errors[0] if errors else "no start"
    return {
        "first_byte": median(firsts, reason),
        "stop": median(stops, reason),
        "samples_ms": {"first_byte": firsts, "stop": stops},
        "errors": errors,
    }


def median(samples: list[float], otherwise: object) -> float | str:
    """The median of samples, rounded, or a failure naming otherwise if there are none."""
    return round(statistics.median(samples), 1) if samples else failed(otherwise)


def difference(value: float | str, base: float | str) -> float | str:
    if isinstance(value, str):
        return value
    if isinstance(base, str):
        return base
    return round(value - base, 1)


def rss(subject: Subject) -> Figures:
    """The client's memory after start, then with connections held open and idle."""
    subject.release()
    tunnel, _took = subject.start()
    pid = tunnel.proc.pid
    figures: Figures = {"rss_started": round(processes.rss_mib(pid), 1)}
    count = subject.settings.sizes.hold
    timeout = subject.settings.sizes.conns_timeout
    try:
        with subject.probe.hold(subject.system.echo, count, timeout, tunnel.proc) as held:
            figures["details"] = held
            time.sleep(SETTLE)
            holding, family = processes.rss_mib(pid), processes.tree_rss_mib(pid)
            if held["ok"]:
                figures["rss_hold"], figures["rss_hold_tree"] = round(holding, 1), round(family, 1)
            else:  # the memory then is still worth knowing, but it is not the figure's
                figures["rss_hold"] = failed(f"{shortfall(held)}; RSS then {holding:.1f} MiB")
                figures["rss_hold_tree"] = failed(
                    f"{shortfall(held)}; with children {family:.1f} MiB"
                )
    except CaseFailed as exc:
        figures["rss_hold"] = figures["rss_hold_tree"] = failed(exc)
    finally:
        stop_quietly(tunnel)
    return figures


def relay(subject: Subject) -> Figures:
    """Bulk each way with the ssh connection through the delaying relay: over one connection,
    then over as many parallel connections as shuttle gets --streams, with one ssh connection
    and with that many. The others run once: they have no --streams."""
    subject.release()
    parallel = subject.settings.streams
    runs: list[tuple[int, tuple[int, ...]]] = [(1, (1, parallel))]  # --streams, iperf3 -P
    if subject.system.takes_streams:
        runs.append((parallel, (parallel,)))
    figures: Figures = {"details": {}}
    for streams, connections in runs:
        keys = [
            (f"relay_{way}_{relay_suffix(streams, count)}", reverse, count)
            for count in connections
            for way, reverse in (("up", False), ("down", True))
        ]
        try:
            tunnel, _took = subject.start(relay=True, streams=streams)
        except CaseFailed as exc:
            figures.update({key: failed(exc) for key, _reverse, _count in keys})
            continue
        try:
            if streams == 1:
                figures.update(relay_echoes(subject, tunnel))
            for key, reverse, count in keys:
                try:
                    result = subject.probe.iperf(
                        subject.system.iperf,
                        subject.settings.sizes.relay_seconds,
                        reverse=reverse,
                        watch=tunnel.proc,
                        parallel=count,
                    )
                    figures[key] = result["MBps"]
                    figures["details"][key] = result
                except CaseFailed as exc:
                    figures[key] = failed(exc)
        finally:
            stop_quietly(tunnel)
    if not subject.system.takes_streams:  # the reference for both of shuttle's rows
        figures["relay_up_streams"] = figures["relay_up_parallel"]
        figures["relay_down_streams"] = figures["relay_down_parallel"]
    return figures


def relay_echoes(subject: Subject, tunnel: Tunnel) -> Figures:
    """Echo round trips through the relay, idle and during an upload: on a long link, what
    an interactive connection waits behind while a bulk one fills the buffers on the way."""
    try:
        idle = echoes(subject, tunnel)
        busy, _upload = echoes_during_upload(subject, tunnel)
    except CaseFailed as exc:
        return {"relay_rtt_idle": failed(exc), "relay_rtt_bulk": failed(exc)}
    return {"relay_rtt_idle": idle["median_us"], "relay_rtt_bulk": busy["median_us"]}


def relay_suffix(streams: int, connections: int) -> str:
    if connections == 1:
        return "one"
    return "parallel" if streams == 1 else "streams"


CASES: dict[str, Callable[[Subject], Figures]] = {
    "bulk": bulk,
    "rtt": rtt,
    "conns": conns,
    "rate": rate,
    "start": start,
    "rss": rss,
    "relay": relay,
}

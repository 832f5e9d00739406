"""The bench's side of a measurement: iperf3 and the load tool, run as the test user on the
client host, each bounded in time and given up as soon as the tunnel under test dies (its
output then says why, in the table's footnote)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.servers import iperf_server
from testbed.config import SYSTEM_PYTHON, check_ours
from testbed.procs import Proc
from testbed.topology import Topology

POLL = 0.02
# C's ephemeral ports, and below them those of the first-byte tool's attempts (see there).
EPHEMERAL_PORTS = (10240, 65535)
FIRST_BYTE_PORTS = (1024, EPHEMERAL_PORTS[0] - 1)
SLACK = 30.0  # beyond a tool's own time limit, before the bench gives up on it
OMIT = 1  # iperf3's first second (TCP's slow start) is not counted


class CaseFailed(Exception):
    """A measurement could not be made; the message says why, briefly."""


def why_exited(proc: Proc) -> str:
    lines = [line for line in proc.output().splitlines() if line.strip()]
    return f"{proc.name} exited ({proc.popen.poll()}): " + " | ".join(lines[-3:])[-300:]


class Tool:
    """A program run as the test user in C: its output read with deadlines, watching a
    tunnel process; killed with its process group when done with."""

    def __init__(self, topo: Topology, argv: list[str], watch: Proc | None) -> None:
        self.watch = watch
        self.name = os.path.basename(argv[1] if argv[0] == SYSTEM_PYTHON else argv[0])
        self.errors = tempfile.TemporaryFile()
        self.popen = subprocess.Popen(
            topo.user_argv(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.errors,
            start_new_session=True,
            cwd=topo.user_dir,
        )
        self.buffer = b""
        self.eof = False

    def _read(self, enough: Callable[[], bool], deadline: float) -> None:
        stdout = self.popen.stdout
        if stdout is None:
            raise CaseFailed(f"{self.name} has no output")
        for _ in range(int((deadline - time.monotonic()) / POLL) + 2):
            if enough() or self.eof:
                return
            if self.watch is not None and not self.watch.alive():
                raise CaseFailed(why_exited(self.watch))
            if time.monotonic() > deadline:
                break
            readable, _w, _x = select.select([stdout], [], [], POLL)
            if readable:
                chunk = os.read(stdout.fileno(), 1 << 16)
                self.buffer += chunk
                self.eof = not chunk
        if not (enough() or self.eof):
            raise CaseFailed(f"{self.name} did not finish in time")

    def line(self, timeout: float) -> str:
        """The next line of output."""
        self._read(lambda: b"\n" in self.buffer, time.monotonic() + timeout)
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode(errors="replace")

    def send(self, text: str) -> None:
        if self.popen.stdin is not None:
            self.popen.stdin.write(text.encode())
            self.popen.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        """Wait for the end of its output; the JSON document that is the rest of it."""
        self._read(lambda: False, time.monotonic() + timeout)
        try:
            parsed: dict[str, Any] = json.loads(self.buffer)
        except ValueError:
            self.errors.seek(0)
            text = self.errors.read().decode(errors="replace").strip()
            raise CaseFailed(f"{self.name} printed no result: {text[-300:]}") from None
        return parsed

    def close(self) -> None:
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self.errors.close()


@contextmanager
def tool(topo: Topology, argv: list[str], watch: Proc | None) -> Iterator[Tool]:
    running = Tool(topo, argv, watch)
    try:
        yield running
    finally:
        running.close()


class Probe:
    """Runs the measurements' tools in one test network."""

    def __init__(self, topo: Topology, tools: Path) -> None:
        self.topo = topo
        self.loadtool_path = str(tools / "loadtool.py")
        self.first_byte_port = FIRST_BYTE_PORTS[0]  # where the next first-byte run goes on

    def _loadtool_argv(self, command: str, host: str, port: int, *args: object) -> list[str]:
        check_ours(host)
        return [SYSTEM_PYTHON, self.loadtool_path, command, host, str(port), *map(str, args)]

    def loadtool(
        self, command: str, address: tuple[str, int], *args: object, timeout: float, watch: Proc
    ) -> dict[str, Any]:
        """Run one load tool command to its end (it stops itself at timeout)."""
        argv = self._loadtool_argv(command, *address, *args, "--timeout", timeout)
        with tool(self.topo, argv, watch) as running:
            return running.result(timeout + SLACK)

    def iperf(
        self,
        address: tuple[str, int],
        seconds: int,
        *,
        reverse: bool,
        watch: Proc,
        parallel: int = 1,
    ) -> dict[str, Any]:
        """iperf3 to address (-R: download) for seconds after the omitted first one, over
        parallel connections."""
        measuring = self._iperf(address, seconds, reverse, watch, parallel)
        with iperf_server(self.topo), measuring as running:
            return iperf_figures(running.result(OMIT + seconds + SLACK))

    @contextmanager
    def _iperf(
        self, address: tuple[str, int], seconds: int, reverse: bool, watch: Proc, parallel: int
    ) -> Iterator[Tool]:
        host, port = check_ours(address[0]), address[1]
        argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J"]
        argv += [f"--omit={OMIT}", f"--parallel={parallel}", *(["-R"] if reverse else [])]
        with tool(self.topo, argv, watch) as running:
            yield running

    @contextmanager
    def upload(
        self, address: tuple[str, int], seconds: float, watch: Proc
    ) -> Iterator[Callable[[], dict[str, Any]]]:
        """An iperf3 upload in the background; what it yields waits for its figures."""
        length = math.ceil(seconds)
        with iperf_server(self.topo), self._iperf(address, length, False, watch, 1) as running:
            yield lambda: iperf_figures(running.result(OMIT + length + SLACK))

    @contextmanager
    def hold(
        self, address: tuple[str, int], count: int, timeout: float, watch: Proc
    ) -> Iterator[dict[str, Any]]:
        """count connections, each echoed once, held open (idle) inside the with block."""
        argv = self._loadtool_argv("hold", *address, count, "--timeout", timeout)
        with tool(self.topo, argv, watch) as running:
            try:
                yield json.loads(running.line(timeout + SLACK))
            except ValueError:
                raise CaseFailed("hold printed no figures") from None

    @contextmanager
    def first_byte(
        self, address: tuple[str, int], timeout: float
    ) -> Iterator[Callable[[float, Proc], float]]:
        """The first-byte tool, started and armed (Python starts slower than ssh). What it
        yields takes the time.time() taken just before a tunnel was started, and the tunnel's
        process; it returns the seconds from then to the first echo through the tunnel."""
        ports = "{}-{}".format(*FIRST_BYTE_PORTS)
        argv = self._loadtool_argv(
            "first-byte",
            *address,
            "--timeout",
            timeout,
            "--ports",
            ports,
            "--from",
            self.first_byte_port,
        )
        with tool(self.topo, argv, None) as running:
            if running.line(SLACK) != "armed":
                raise CaseFailed("the load tool did not arm")

            def measure(since: float, proc: Proc) -> float:
                running.send(f"{since!r}\n")
                running.watch = proc
                figures = running.result(timeout + SLACK)
                self.first_byte_port = figures.get("next", self.first_byte_port)
                if not figures["ok"]:
                    raise CaseFailed(figures.get("error", "no echo"))
                return float(figures["seconds"])

            yield measure


def iperf_figures(report: dict[str, Any]) -> dict[str, Any]:
    if "error" in report:
        raise CaseFailed(f"iperf3: {report['error']}")
    end = report["end"]
    return {
        "MBps": round(end["sum_received"]["bits_per_second"] / 8e6, 1),
        "retransmits": end["sum_sent"].get("retransmits"),
        "seconds": round(end["sum_received"]["seconds"], 2),
    }

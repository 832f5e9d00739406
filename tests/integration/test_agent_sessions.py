"""More agent sessions over one ssh connection (client/shuttle_client/agent_sessions.py): with
the ssh hop behind a relay that delays it 50 ms each way, a bulk upload is held back by the
ssh session channel's window, the client opens more sessions through its ControlMaster, and
later connections spread over their agents; on the plain network, a bulk upload gets a quiet
session beside it, where a connection made during the upload goes; where ssh refuses to be
a master, the tunnel keeps one session and still works."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest

from testbed import BULK_PORT, SYSTEM_PYTHON, T_ADDR, Shuttle, Topology
from testbed.config import S_ADDR_C, SSH_PORT
from testbed.procs import wait_until

from .checks import assert_echo

pytestmark = pytest.mark.integration

RELAY_PORT = 2222
RELAY = Path(__file__).parents[2] / "bench" / "delayrelay.py"
# 50 ms each way: one session's window caps it at 2 MiB per 100 ms (21 MB/s), a rate that
# even a loaded host reaches (at 20 ms, 52 MB/s, it did not always: then no session opens).
DELAY_MS = 50
# Enough to be held back by that window for a few seconds.
FIRST_UPLOAD = 60 * 1024 * 1024
SPREAD_UPLOAD = 24 * 1024 * 1024
PARALLEL = 4
# Long enough, on the plain network, to outlast the quiet session's start (a measure every
# 0.5 s, then an agent's start) by seconds even on an idle machine: ~200 MB/s.
LONG_UPLOAD = 512 * 1024 * 1024
BESIDE_UPLOAD = 32 * 1024 * 1024


@pytest.fixture
def relay(topo: Topology) -> Iterator[str]:
    """The delaying relay in front of S's sshd; the ssh command (-e) that goes through it."""
    script = topo.run_dir / "delayrelay.py"
    shutil.copyfile(RELAY, script)
    argv = [SYSTEM_PYTHON, str(script), S_ADDR_C, str(RELAY_PORT), S_ADDR_C, str(SSH_PORT)]
    proc = topo.start("relay", topo.s.argv([*argv, f"--delay-ms={DELAY_MS}"]))
    try:
        assert topo.s.wait_listening(RELAY_PORT, timeout=15), proc.describe()
        yield f"{topo.ssh_command()} -p {RELAY_PORT}"
    finally:
        proc.stop(timeout=5)


def agents(topo: Topology) -> List[int]:
    """The agents on S: the test user's python processes there."""
    return topo.processes_of(topo.s, topo.user, "python")


def uploading(topo: Topology) -> Set[int]:
    """The processes on S with a connection open to T's bulk server: the agents carrying."""
    out = topo.s.run(["ss", "-Htnp", "dst", f"{T_ADDR}:{BULK_PORT}"], timeout=10).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def upload(shuttle: Shuttle, size: int, seed: str) -> Dict[str, object]:
    return shuttle.topo.tcptool("up", T_ADDR, str(BULK_PORT), str(size), seed, timeout=90)


def test_a_window_bound_upload_opens_more_sessions_and_new_connections_spread(
    shuttle: Shuttle, relay: str
) -> None:
    topo = shuttle.topo
    shuttle.start_client(extra=["--tcp=agent"], ssh_cmd=relay)
    assert len(agents(topo)) == 1
    result = upload(shuttle, FIRST_UPLOAD, "first")
    assert result["ok"], f"{result}\n{shuttle.outputs()}"
    assert wait_until(lambda: len(agents(topo)) >= 3, 10), (agents(topo), shuttle.outputs())
    results: List[Dict[str, object]] = []
    carriers: Set[int] = set()
    threads = [
        threading.Thread(target=lambda i=i: results.append(upload(shuttle, SPREAD_UPLOAD, f"s{i}")))
        for i in range(PARALLEL)
    ]
    for thread in threads:
        thread.start()

    def spread() -> bool:  # the agents seen holding connections to the bulk server
        carriers.update(uploading(topo))
        return len(carriers & set(agents(topo))) >= 2

    wait_until(spread, 60)
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == PARALLEL and all(r["ok"] for r in results), results
    assert len(carriers & set(agents(topo))) >= 2, (carriers, agents(topo))
    assert_echo(shuttle, T_ADDR)


def test_a_bulk_upload_gets_a_quiet_session_beside_it_for_new_connections(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    client = shuttle.start_client(extra=["--tcp=agent", "-v"])
    assert len(agents(topo)) == 1
    results: List[Dict[str, object]] = []
    first = threading.Thread(target=lambda: results.append(upload(shuttle, LONG_UPLOAD, "long")))
    first.start()
    try:
        opened = "session 2: opened"
        assert wait_until(lambda: opened in client.output() or not first.is_alive(), 30)
        assert first.is_alive(), f"the upload ended before a second session opened: {results}"
        (bulk,) = uploading(topo)
        carriers: Set[int] = set()
        second = threading.Thread(
            target=lambda: results.append(upload(shuttle, BESIDE_UPLOAD, "beside"))
        )
        second.start()
        wait_until(lambda: bool(carriers.update(uploading(topo)) or carriers - {bulk}), 30, 0.02)
        second.join(timeout=60)
    finally:
        first.join(timeout=120)
    assert len(results) == 2 and all(r["ok"] for r in results), results
    assert carriers - {bulk} and carriers <= set(agents(topo)), (bulk, carriers, client.output())


def test_without_a_master_the_tunnel_keeps_one_session(shuttle: Shuttle, relay: str) -> None:
    # ssh takes an option's first value: the user's -e refuses the master shuttle asks for.
    client = shuttle.start_client(extra=["--tcp=agent"], ssh_cmd=f"{relay} -o ControlMaster=no")
    result = upload(shuttle, FIRST_UPLOAD, "first")
    assert result["ok"], f"{result}\n{shuttle.outputs()}"
    assert wait_until(lambda: "one agent session only" in client.output(), 10), client.output()
    assert len(agents(shuttle.topo)) == 1
    assert_echo(shuttle, T_ADDR)

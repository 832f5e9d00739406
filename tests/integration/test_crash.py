"""SIGKILL at a random moment of a transfer, to the client, the agent, ssh or firewalld:
afterwards no rule, table, ip rule, route or hosts block of shuttle's is left once the lease
has passed (or firewalld has started again), and the next session works. A client whose
firewalld was killed opens its session again once firewalld is back.

The moments come from a seeded generator, so a failure can be replayed; the suite runs one
round per case (its time is bounded), the slow run five, and each round waits only as long
as its bounded waits allow.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import List

import pytest

from testbed import BULK_PORT, HTTP_PORT, SYSTEM_PYTHON, T_ADDR, Shuttle
from testbed.procs import Proc, wait_until

pytestmark = pytest.mark.integration

# Rounds per case: one in the suite, more in the slow run (pytest -m slow).
ROUNDS = (pytest.param(1, id="1-round"), pytest.param(5, id="5-rounds", marks=pytest.mark.slow))
MARKER = "# shuttle session "  # firewalld's hosts block lines begin with it
RECONNECTED = "shuttle-client: reconnected"
REOPENED = "shuttle-client: firewall session open again"
CASES = [
    ("client", "nft"),
    ("agent", "nft"),
    ("ssh", "nat"),
    ("firewalld", "nft"),
    ("firewalld", "tproxy"),
]


def children_named(pid: int, name: str) -> List[int]:
    children: List[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in children if Path(f"/proc/{c}/comm").read_text().strip() == name]


def hosts_block(shuttle: Shuttle) -> bool:
    return shuttle.hosts_file.exists() and MARKER in shuttle.hosts_file.read_text()


def start_transfer(shuttle: Shuttle, round_no: int) -> Proc:
    topo = shuttle.topo
    argv = [SYSTEM_PYTHON, str(topo.tcptool_path), "down", T_ADDR, str(BULK_PORT), str(2**34)]
    return topo.start(f"transfer{round_no}", topo.user_argv([*argv, "seed", "--timeout", "60"]))


def kill(shuttle: Shuttle, victim: str, client: Proc) -> None:
    if victim == "client":
        client.send(signal.SIGKILL)
    elif victim == "firewalld":
        assert shuttle.firewalld is not None
        shuttle.firewalld.send(signal.SIGKILL)
    else:
        topo = shuttle.topo
        if victim == "agent":
            pids = topo.processes_of(topo.s, topo.user, "python")
        else:
            pids = children_named(client.pid, "ssh")
        assert pids, f"no {victim} process to kill\n{shuttle.outputs()}"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


def restart_firewalld(shuttle: Shuttle) -> None:
    shuttle.stop_firewalld()
    shuttle.start_firewalld()


@pytest.mark.parametrize("rounds", ROUNDS)
@pytest.mark.parametrize(("victim", "method"), CASES, ids=[f"{v}-{m}" for v, m in CASES])
def test_sigkill_at_any_moment_leaves_nothing_and_the_next_session_works(
    shuttle: Shuttle, victim: str, method: str, rounds: int
) -> None:
    rng = random.Random(f"{victim}-{method}")
    shuttle.write_policy(f"allow {shuttle.topo.user.name} hosts\n")
    restart_firewalld(shuttle)
    for round_no in range(rounds):
        client = shuttle.start_client(method=method, extra=["-H", "--keepalive=1"])
        assert wait_until(lambda: hosts_block(shuttle), 20, interval=0.2), shuttle.outputs()
        transfer = start_transfer(shuttle, round_no)
        time.sleep(rng.uniform(0.1, 1.5))  # the random moment
        assert transfer.alive(), f"the transfer ended early\n{transfer.output()}"
        kill(shuttle, victim, client)
        if victim == "client":
            assert client.wait(10) == -signal.SIGKILL
        elif victim == "firewalld":
            restart_firewalld(shuttle)  # and at its start it removes what the killed one left
            # The client saw the connection drop and opens its session again, by itself.
            assert client.wait_for_line(REOPENED, 30), shuttle.outputs()
            assert "lost the firewall session" in client.output()
            assert shuttle.stop_client(client) == 0, shuttle.outputs()
        else:
            assert client.wait_for_line(RECONNECTED, 30), shuttle.outputs()
            assert client.alive()
            assert shuttle.stop_client(client) == 0, shuttle.outputs()
        transfer.stop(timeout=10)
        left = shuttle.wait_rules_gone(timeout=shuttle.lease + 10)
        assert left == [], f"round {round_no}: {left}\n{shuttle.outputs()}"
        assert wait_until(lambda: not hosts_block(shuttle), 10, interval=0.2), (
            f"round {round_no}: {shuttle.hosts_file.read_text()}"
        )
        # The next session works.
        client = shuttle.start_client(method=method)
        page = shuttle.topo.curl(T_ADDR, HTTP_PORT, max_time=20)
        assert page.returncode == 0, f"round {round_no}: {page.stderr}\n{shuttle.outputs()}"
        assert shuttle.stop_client(client) == 0

"""Losing the tunnel: the client reconnects under the same firewall session, and while it is
down, captured traffic does not leave by any other path (the kill switch)."""

from __future__ import annotations

import os
import signal

import pytest

from testbed import BULK_PORT, HTTP_PORT, SYSTEM_PYTHON, T_ADDR, Shuttle, Topology, shuttle_rules
from testbed.config import C_ADDR
from testbed.procs import wait_until

from .checks import RECONNECTED, received

pytestmark = pytest.mark.integration

LOST = "shuttle-client: lost the tunnel"
# In S: sshd's port answers new connections with a reset, so reconnecting fails fast.
BLOCK_SSH = (
    "add table inet block; "
    "add chain inet block input { type filter hook input priority 0; }; "
    "add rule inet block input tcp dport 22 reject with tcp reset"
)


def kill_sessions(topo: Topology) -> None:
    pids = topo.processes_of(topo.s, topo.user, "sshd")
    assert pids, "no sshd session process in S"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def http_requests_from(topo: Topology, address: str) -> int:
    """How many requests T's web server logged from address (its socket is dual-stack, so
    IPv4 peers appear as ::ffff:a.b.c.d)."""
    log = (topo.logs / "http.log").read_text(errors="replace")
    prefixes = (f"{address} ", f"::ffff:{address} ")
    return sum(1 for line in log.splitlines() if line.startswith(prefixes) and "GET" in line)


def test_killing_the_ssh_session_mid_transfer_reconnects(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    client = shuttle.start_client(extra=["--keepalive=1"])
    argv = [str(topo.tcptool_path), "down", T_ADDR, str(BULK_PORT), str(2**34), "seed"]
    transfer = topo.start("transfer", topo.user_argv([SYSTEM_PYTHON, *argv, "--timeout", "60"]))
    assert wait_until(lambda: received(topo, BULK_PORT) > 2**20, 30), transfer.output()
    kill_sessions(topo)
    assert transfer.wait(30) not in (0, None), (
        f"the transfer should break\n{transfer.output()}\n{shuttle.outputs()}"
    )
    # A reset, not a clean end that would look like a (short) complete transfer.
    assert "ConnectionResetError" in transfer.output(), f"{transfer.output()}\n{shuttle.outputs()}"
    assert client.wait_for_line(RECONNECTED, 30), shuttle.outputs()
    assert client.alive()
    page = topo.curl(T_ADDR, HTTP_PORT, max_time=20)
    assert page.returncode == 0 and topo.marker in page.stdout, (
        f"{page.stderr}\n{shuttle.outputs()}"
    )


@pytest.mark.parametrize("tcp", ["agent", "auto"])
def test_while_the_tunnel_is_down_nothing_goes_another_way(shuttle: Shuttle, tcp: str) -> None:
    topo = shuttle.topo
    # Give C a direct path to T: S forwards (T routes back through S already). Without the
    # kill switch, a captured connection during the outage would now reach T directly.
    topo.s.sysctl("net.ipv4.ip_forward", "1")
    direct = topo.curl(T_ADDR, HTTP_PORT, max_time=10)
    assert direct.returncode == 0, f"the direct path must work for this test: {direct.stderr}"
    assert http_requests_from(topo, C_ADDR) == 1
    client = shuttle.start_client(extra=["--keepalive=1", "--wait-tunnel=3", f"--tcp={tcp}"])
    topo.s.run(["nft", BLOCK_SSH], timeout=10, check=True)
    kill_sessions(topo)
    assert client.wait_for_line(LOST, 20), shuttle.outputs()
    assert shuttle_rules(topo), "the rules must stay while the tunnel is down"
    during = topo.curl(T_ADDR, HTTP_PORT, max_time=10)
    assert during.returncode != 0, f"reached the target during the outage\n{during.stdout}"
    assert http_requests_from(topo, C_ADDR) == 1, "a request went the direct way"
    topo.s.run(["nft", "delete table inet block"], timeout=10, check=True)
    assert client.wait_for_line(RECONNECTED, 40), shuttle.outputs()
    after = topo.curl(T_ADDR, HTTP_PORT, max_time=20)
    assert after.returncode == 0 and topo.marker in after.stdout, shuttle.outputs()
    assert http_requests_from(topo, C_ADDR) == 1, "after the outage, still through the tunnel"

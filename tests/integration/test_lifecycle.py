"""The firewall rules follow the client's life: stopped or killed, nothing stays behind, with
either firewall method and in every view of the firewall (nft, iptables, ip6tables)."""

from __future__ import annotations

import signal

import pytest

from testbed import TARGET_NET, TARGET_NET6, Shuttle, shuttle_rules
from testbed.procs import wait_until

SUBNETS = (TARGET_NET, TARGET_NET6)

pytestmark = pytest.mark.integration


def test_killed_client_rules_expire_with_the_lease(shuttle: Shuttle, method: str) -> None:
    client = shuttle.start_client(subnets=SUBNETS, method=method)
    assert shuttle_rules(shuttle.topo), "no SHUTTLE rules while the client runs"
    client.send(signal.SIGKILL)
    assert client.wait(10) == -signal.SIGKILL
    gone = wait_until(lambda: not shuttle_rules(shuttle.topo), shuttle.lease + 5, interval=0.25)
    assert gone, f"rules still there: {shuttle_rules(shuttle.topo)}\n{shuttle.outputs()}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopped_client_exits_0_and_removes_rules(shuttle: Shuttle, method: str, sig: int) -> None:
    client = shuttle.start_client(subnets=SUBNETS, method=method)
    assert shuttle_rules(shuttle.topo), "no SHUTTLE rules while the client runs"
    client.send(sig)
    code = client.wait(15)
    assert code == 0, f"exit code {code}\n{shuttle.outputs()}"
    # The client closes its session before it exits; allow firewalld a moment to finish.
    gone = wait_until(lambda: not shuttle_rules(shuttle.topo), 5, interval=0.1)
    assert gone, f"rules still there: {shuttle_rules(shuttle.topo)}\n{shuttle.outputs()}"

"""Both firewall methods, both IP families: the page comes through the tunnel only, each method
leaves its own kind of rules, and nothing stays after the client stops."""

from __future__ import annotations

import pytest

from testbed import (
    METHODS,
    T_ADDR,
    T_ADDR6,
    TARGET_NET,
    TARGET_NET6,
    Shuttle,
    nft_tables,
    ready_line,
    ready_method,
    wait_rules_gone,
)

from .checks import (
    assert_echo,
    assert_method_rules,
    assert_no_rules,
    assert_not_captured,
    assert_page,
    firewall_objects,
)

pytestmark = pytest.mark.integration


def test_ipv4_and_ipv6_through_the_tunnel(shuttle: Shuttle, method: str) -> None:
    topo = shuttle.topo
    for host in (T_ADDR, T_ADDR6):
        assert_not_captured(shuttle, host)  # without shuttle: unreachable
    client = shuttle.start_client(subnets=[TARGET_NET, TARGET_NET6], method=method)
    assert ready_line(client).startswith("shuttle-client: ready")
    assert ready_method(client) == method, ready_line(client)
    assert_method_rules(shuttle, method)
    assert_page(shuttle, T_ADDR)
    assert_page(shuttle, T_ADDR6)
    assert_echo(shuttle, T_ADDR6)
    assert shuttle.stop_client(client) == 0, shuttle.outputs()
    assert not wait_rules_gone(topo), shuttle.outputs()
    assert_no_rules(topo)
    for host in (T_ADDR, T_ADDR6):
        assert_not_captured(shuttle, host)  # and unreachable again


def test_auto_method_prefers_nft(shuttle: Shuttle) -> None:
    """Without --method the client asks for auto; firewalld picks nft when nft works."""
    topo = shuttle.topo
    probe = topo.c.run(["nft", "list", "tables"], timeout=15)
    assert probe.returncode == 0, f"nft does not work here: {probe.stderr}"
    client = shuttle.start_client(subnets=[TARGET_NET, TARGET_NET6])
    chosen = ready_method(client)
    assert chosen in METHODS, f"the ready line names no method: {ready_line(client)!r}"
    assert chosen == "nft", ready_line(client)
    assert_method_rules(shuttle, chosen)
    assert_page(shuttle, T_ADDR6)


def test_explicit_auto_is_the_default(shuttle: Shuttle) -> None:
    client = shuttle.start_client(subnets=[TARGET_NET], extra=["--method=auto"])
    assert ready_method(client) == "nft", ready_line(client)
    assert_page(shuttle, T_ADDR)


def test_one_nft_table_per_session(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    first = shuttle.start_client(subnets=[TARGET_NET], method="nft")
    one = nft_tables(topo)
    assert len(one) == 1, one
    second = shuttle.start_client(subnets=[TARGET_NET6], method="nft")
    two = nft_tables(topo)
    assert len(two) == 2 and set(one) < set(two), two
    ruleset = topo.c.run(["nft", "list", "table", "inet", one[0]], check=True).stdout
    assert "198.18.2.0/24" in ruleset, ruleset
    assert shuttle.stop_client(second) == 0
    assert nft_tables(topo) == one
    assert shuttle.stop_client(first) == 0
    assert not wait_rules_gone(topo), shuttle.outputs()


@pytest.mark.parametrize("family", ["ipv4", "ipv6", "both"])
def test_no_leftovers_after_stop(shuttle: Shuttle, method: str, family: str) -> None:
    topo = shuttle.topo
    subnets = {"ipv4": [TARGET_NET], "ipv6": [TARGET_NET6], "both": [TARGET_NET, TARGET_NET6]}
    client = shuttle.start_client(subnets=subnets[family], method=method)
    assert firewall_objects(topo), "no shuttle table or chain while the client runs"
    assert shuttle.stop_client(client) == 0, shuttle.outputs()
    assert not wait_rules_gone(topo), shuttle.outputs()
    assert_no_rules(topo)

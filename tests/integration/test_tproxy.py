"""The tproxy method: firewalld makes transparent TCP and UDP sockets and hands them to the
unprivileged client, so TCP and UDP to the target both go through the tunnel, in both IP
families. A captured datagram's answer must come back from the original destination's address
and port; a datagram that is not captured (excluded, another user's) gets no answer, as
without shuttle. Stopped or killed, the client leaves no nft table, no fwmark `ip rule` and no
routing table behind.
"""

from __future__ import annotations

import signal
from typing import Any, List

import pytest

from testbed import (
    BULK_PORT,
    ECHO_PORT,
    T_ADDR,
    T_ADDR2,
    T_ADDR6,
    T_ADDR6_2,
    TARGET_NET,
    TARGET_NET6,
    TPROXY,
    Shuttle,
    nat_chains,
    nft_tables,
    ready_line,
    ready_method,
    routing_leftovers,
)
from testbed.procs import Proc

from .checks import (
    assert_echo,
    assert_no_rules,
    assert_not_captured,
    assert_page,
    assert_udp_echo,
)

pytestmark = pytest.mark.integration

SUBNETS = (TARGET_NET, TARGET_NET6)
BULK_BYTES = 100 * 1024 * 1024


def start_tproxy(shuttle: Shuttle, **kwargs: Any) -> Proc:
    """shuttle-client --method tproxy (both families unless told); its ready line says so."""
    kwargs.setdefault("subnets", SUBNETS)
    client = shuttle.start_client(method=TPROXY, **kwargs)
    assert ready_method(client) == TPROXY, ready_line(client)
    return client


def assert_udp_silent(shuttle: Shuttle, host: str, **kwargs: Any) -> None:
    """Datagrams to host's UDP echo get no answer: not captured (S does not forward)."""
    result = shuttle.topo.udp_silent(host, **kwargs)
    assert result["ok"], f"UDP to {host} should get no answer: {result}\n{shuttle.outputs()}"


def policy_routing(shuttle: Shuttle) -> List[str]:
    """The fwmark rules and routing tables C has now and had not before firewalld started."""
    assert shuttle.routing_before is not None
    return routing_leftovers(shuttle.topo, shuttle.routing_before)


def assert_tproxy_rules(shuttle: Shuttle) -> None:
    """An nft table of the session, no nat chain, and per family a fwmark rule and a table."""
    topo = shuttle.topo
    tables = nft_tables(topo)
    assert tables, f"no inet shuttle-* table for the tproxy method\n{shuttle.outputs()}"
    chains = nat_chains(topo)
    assert not chains[4] and not chains[6], f"nat chains with the tproxy method: {chains}"
    routing = policy_routing(shuttle)
    for version in ("-4", "-6"):
        rules = [line for line in routing if line.startswith(f"ip {version} rule:")]
        routes = [line for line in routing if line.startswith(f"ip {version} table ")]
        assert rules, f"no new fwmark rule in `ip {version} rule`: {routing}"
        assert routes, f"no new routing table in `ip {version} route show table all`: {routing}"


def assert_all_gone(shuttle: Shuttle, timeout: float) -> None:
    left = shuttle.wait_rules_gone(timeout=timeout)
    assert not left, f"left behind: {left}\n{shuttle.outputs()}"
    assert_no_rules(shuttle.topo)
    assert not policy_routing(shuttle)


# --- TCP -------------------------------------------------------------------------------------


def test_tcp_through_tproxy_both_families(shuttle: Shuttle) -> None:
    for host in (T_ADDR, T_ADDR6):
        assert_not_captured(shuttle, host)  # without shuttle: unreachable
    start_tproxy(shuttle)
    assert_tproxy_rules(shuttle)
    for host in (T_ADDR, T_ADDR6):
        assert_page(shuttle, host)
        assert_echo(shuttle, host, ECHO_PORT)


def test_tcp_bulk_100mb_down_is_byte_exact(shuttle: Shuttle) -> None:
    start_tproxy(shuttle, subnets=[TARGET_NET])
    result = shuttle.topo.tcptool(
        "down", T_ADDR, str(BULK_PORT), str(BULK_BYTES), "tproxy-bulk-down", timeout=300
    )
    assert result["ok"], f"{result}\n{shuttle.outputs()}"
    assert result["bytes"] == BULK_BYTES


def test_tcp_200_simultaneous_echo_connections(shuttle: Shuttle) -> None:
    start_tproxy(shuttle, subnets=[TARGET_NET])
    result = shuttle.topo.tcptool("echo", T_ADDR, str(ECHO_PORT), "200", timeout=120)
    assert result["ok"], f"{result}\n{shuttle.outputs()}"
    assert result["good"] == 200


# --- UDP -------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", [T_ADDR, T_ADDR6], ids=["ipv4", "ipv6"])
def test_udp_echo_through_tproxy(shuttle: Shuttle, host: str) -> None:
    """No answer without shuttle; through it every datagram, from the target's address."""
    assert_udp_silent(shuttle, host)
    start_tproxy(shuttle)
    assert_udp_echo(shuttle, host)
    assert_udp_echo(shuttle, host)  # a second flow (another local port) works as well


def test_udp_excluded_address_is_not_captured(shuttle: Shuttle) -> None:
    """-x for one address per family: its datagrams get no answer; the target's other
    address is captured and answers, from itself."""
    start_tproxy(shuttle, excludes=[f"{T_ADDR}/32", T_ADDR6])
    assert_udp_silent(shuttle, T_ADDR)
    assert_udp_silent(shuttle, T_ADDR6)
    assert_udp_echo(shuttle, T_ADDR2)
    assert_udp_echo(shuttle, T_ADDR6_2)


def test_other_users_udp_and_tcp_are_not_captured(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    start_tproxy(shuttle)
    for host in (T_ADDR, T_ADDR6):
        assert_udp_silent(shuttle, host, user=topo.user2)
        assert_not_captured(shuttle, host, user=topo.user2)
    # The session's own user still gets through, in both protocols.
    for host in (T_ADDR, T_ADDR6):
        assert_udp_echo(shuttle, host)
        assert_page(shuttle, host)


# --- leftovers -------------------------------------------------------------------------------


def test_stopped_client_leaves_nothing(shuttle: Shuttle) -> None:
    client = start_tproxy(shuttle)
    assert_tproxy_rules(shuttle)
    assert_udp_echo(shuttle, T_ADDR, count=3)
    code = shuttle.stop_client(client)
    assert code == 0, f"exit code {code}\n{shuttle.outputs()}"
    # The client closes its session before it exits; allow firewalld a moment to finish.
    assert_all_gone(shuttle, timeout=5)
    assert_udp_silent(shuttle, T_ADDR)
    assert_not_captured(shuttle, T_ADDR6)


def test_killed_client_leaves_nothing_after_the_lease(shuttle: Shuttle) -> None:
    client = start_tproxy(shuttle)
    assert_tproxy_rules(shuttle)
    assert_udp_echo(shuttle, T_ADDR6, count=3)
    client.send(signal.SIGKILL)
    assert client.wait(10) == -signal.SIGKILL
    assert_all_gone(shuttle, timeout=shuttle.lease + 5)
    assert_udp_silent(shuttle, T_ADDR6)

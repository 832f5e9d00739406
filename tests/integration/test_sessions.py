"""Sessions are scoped and independent: a session captures only its own user's traffic, and
two sessions at once each work, and stopping one leaves the other's rules and traffic intact."""

from __future__ import annotations

import pytest

from testbed import T_ADDR, T_ADDR2, T_ADDR6, TARGET_NET, TARGET_NET6, Shuttle, wait_rules_gone
from testbed.procs import wait_until

from .checks import assert_not_captured, assert_page, firewall_objects

pytestmark = pytest.mark.integration


def test_other_users_traffic_is_not_captured(shuttle: Shuttle, method: str) -> None:
    topo = shuttle.topo
    shuttle.start_client(subnets=[TARGET_NET, TARGET_NET6], method=method)
    for host in (T_ADDR, T_ADDR6):
        assert_page(shuttle, host)  # the session's own user
        assert_not_captured(shuttle, host, user=topo.user2)  # another local user
    # And still so after the second user tried: the first one's traffic flows.
    assert_page(shuttle, T_ADDR)


def test_two_users_two_sessions(shuttle: Shuttle, method: str) -> None:
    """Each user its own session and subnet; stopping the first leaves the second intact."""
    topo = shuttle.topo
    first = shuttle.start_client(subnets=[f"{T_ADDR}/32"], method=method)
    objects_first = firewall_objects(topo)
    second = shuttle.start_client(subnets=[f"{T_ADDR2}/32"], method=method, user=topo.user2)
    objects_both = firewall_objects(topo)
    objects_second = objects_both - objects_first
    assert objects_second, f"no rules of its own for the second session: {objects_both}"

    assert_page(shuttle, T_ADDR)
    assert_page(shuttle, T_ADDR2, user=topo.user2)
    # Each session captures only its own user's connections to its own subnet.
    assert_not_captured(shuttle, T_ADDR2)
    assert_not_captured(shuttle, T_ADDR, user=topo.user2)

    assert shuttle.stop_client(first) == 0, shuttle.outputs()
    gone = wait_until(lambda: firewall_objects(topo) == objects_second, 5, interval=0.1)
    assert gone, f"expected only {objects_second}, found {firewall_objects(topo)}"
    assert second.alive(), shuttle.outputs()
    assert_page(shuttle, T_ADDR2, user=topo.user2)
    assert_not_captured(shuttle, T_ADDR)

    assert shuttle.stop_client(second) == 0, shuttle.outputs()
    assert not wait_rules_gone(topo), shuttle.outputs()


def test_one_user_two_sessions(shuttle: Shuttle, method: str) -> None:
    """The same user on two listeners, one session for IPv4 and one for IPv6."""
    topo = shuttle.topo
    v4 = shuttle.start_client(subnets=[TARGET_NET], method=method)
    objects_v4 = firewall_objects(topo)
    v6 = shuttle.start_client(subnets=[TARGET_NET6], method=method)
    objects_v6 = firewall_objects(topo) - objects_v4
    assert objects_v6, f"no rules of its own for the second session: {firewall_objects(topo)}"
    assert_page(shuttle, T_ADDR)
    assert_page(shuttle, T_ADDR6)

    assert shuttle.stop_client(v4) == 0, shuttle.outputs()
    gone = wait_until(lambda: firewall_objects(topo) == objects_v6, 5, interval=0.1)
    assert gone, f"expected only {objects_v6}, found {firewall_objects(topo)}"
    assert v6.alive(), shuttle.outputs()
    assert_page(shuttle, T_ADDR6)
    assert_not_captured(shuttle, T_ADDR)

"""The test network itself, without shuttle: what the other integration tests rely on."""

from __future__ import annotations

import pytest

from testbed import (
    BULK_PORT,
    ECHO_PORT,
    HTTP_PORT,
    S_ADDR6_C,
    S_ADDR_C,
    SYSTEM_PYTHON,
    T_ADDR,
    T_ADDR2,
    T_ADDR6,
    T_ADDR6_2,
    UDP_ECHO_PORT,
    LocalUser,
    Topology,
    UserVenv,
    routing_leftovers,
    routing_state,
    shuttle_rules,
)
from testbed.config import C_ADDR6, OWN_RANGE6, S_ADDR6_T, check_ours, url_host
from testbed.netns import list_namespaces
from testbed.topology import curl_argv

pytestmark = [pytest.mark.integration, pytest.mark.shared_network]

TARGETS = [T_ADDR, T_ADDR2, T_ADDR6, T_ADDR6_2]


@pytest.mark.parametrize("host", [T_ADDR, T_ADDR6])
@pytest.mark.parametrize("who", ["user", "user2"])
def test_target_is_unreachable_from_the_client_host(topo: Topology, host: str, who: str) -> None:
    user = topo.user if who == "user" else topo.user2
    result = topo.curl(host, HTTP_PORT, max_time=2, user=user)
    # 28: timed out. The packet is routed to S and dropped there, not rejected.
    assert result.returncode == 28, result.stderr
    assert not shuttle_rules(topo)


def test_the_ssh_server_does_not_forward(topo: Topology) -> None:
    for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
        assert topo.s.run(["sysctl", "-n", key], check=True).stdout.strip() == "0", key
    # The packets do reach S: C routes both families to it.
    for family, dest in (("-4", T_ADDR), ("-6", T_ADDR6)):
        route = topo.c.run(["ip", family, "route", "get", dest], check=True).stdout
        assert "via" in route and "dev to-s" in route, route


def test_addresses_are_usable_at_once(topo: Topology) -> None:
    """nodad: no address is tentative, and C has ::1 for the client's IPv6 listener."""
    for ns in topo.namespaces:
        out = ns.run(["ip", "-6", "addr", "show", "tentative"], check=True).stdout
        assert not out.strip(), f"{ns.name}: {out}"
    lo = topo.c.run(["ip", "-6", "addr", "show", "dev", "lo"], check=True).stdout
    assert "::1/128" in lo
    s_addrs = topo.s.run(["ip", "-6", "addr", "show"], check=True).stdout
    assert f"{S_ADDR6_C}/64" in s_addrs and f"{S_ADDR6_T}/64" in s_addrs, s_addrs


def test_guard_keeps_traffic_in_the_test_network() -> None:
    assert check_ours(T_ADDR6) == T_ADDR6
    assert check_ours(f"[{C_ADDR6}]") == f"[{C_ADDR6}]"
    assert check_ours("::1") == "::1"
    for outside in ("2001:db8::1", "fd00:5f::1", "198.20.0.1", "[2001:db8::1]"):
        with pytest.raises(ValueError, match="outside the test network"):
            check_ours(outside)
    assert not check_ours(str(OWN_RANGE6.network_address + 1)).startswith("[")
    assert curl_argv(T_ADDR6, HTTP_PORT, 2)[-1] == f"http://[{T_ADDR6}]:{HTTP_PORT}/"


@pytest.mark.parametrize("host", TARGETS)
def test_servers_answer_from_the_ssh_server(topo: Topology, host: str) -> None:
    page = topo.s.run(curl_argv(host, HTTP_PORT, 5))
    assert page.returncode == 0, page.stderr
    assert topo.marker in page.stdout
    echo = topo.tcptool("echo", host, str(ECHO_PORT), "20", timeout=30, ns=topo.s)
    assert echo["ok"], echo
    size = str(1 << 20)
    for direction in ("up", "down"):
        bulk = topo.tcptool(direction, host, str(BULK_PORT), size, "seed", timeout=30, ns=topo.s)
        assert bulk["ok"], bulk


@pytest.mark.parametrize("host", TARGETS)
def test_udp_echo_answers_from_the_ssh_server(topo: Topology, host: str) -> None:
    """Every datagram (up to 1400 bytes, and 8000) comes back, from the address it was sent
    to: the target has two per family, and the echo must not answer from the other one."""
    result = topo.udp_echo(host, ns=topo.s)
    assert result["ok"], result
    assert result["echoed"] == result["datagrams"] == 20, result
    assert result["sizes"] == [32, 8000], result
    assert result["sources"] == [f"{url_host(host)}:{UDP_ECHO_PORT}"], result


def test_udp_echo_listens_on_both_families(topo: Topology) -> None:
    bound = sorted(topo.t.listeners(UDP_ECHO_PORT, udp=True))
    assert bound == sorted([f"0.0.0.0:{UDP_ECHO_PORT}", f"[::]:{UDP_ECHO_PORT}"]), bound


@pytest.mark.parametrize("host", [T_ADDR, T_ADDR6])
@pytest.mark.parametrize("who", ["user", "user2"])
def test_udp_echo_is_unreachable_from_the_client_host(topo: Topology, host: str, who: str) -> None:
    user = topo.user if who == "user" else topo.user2
    result = topo.udp_silent(host, user=user)
    assert result["ok"], result
    assert result["answers"] == 0 and result["sent"] > 0, result


def test_udp_silent_check_sees_an_answer(topo: Topology) -> None:
    """The "no answer" check can fail: from S, where the echo is reachable, it does."""
    result = topo.udp_silent(T_ADDR, ns=topo.s, wait=1)
    assert not result["ok"], result
    assert result["answers"] > 0, result


def test_routing_leftovers_sees_new_fwmark_rules_and_tables(topo: Topology) -> None:
    """The leftover check of the tproxy method's policy routing: a fwmark rule and a routing
    table that were not there before are found, in each family, and nothing else is."""
    before = routing_state(topo)
    assert not before.rules, f"a fresh client host has fwmark rules: {before.rules}"
    assert routing_leftovers(topo, before) == []
    table = "4242"
    added = []
    try:
        for version in ("-4", "-6"):
            default = "0.0.0.0/0" if version == "-4" else "::/0"
            route = ["route", "add", "local", default, "dev", "lo", "table", table]
            rule = ["rule", "add", "fwmark", "0x4242", "lookup", table]
            for argv in (route, rule):
                topo.c.ip(version, *argv)
                added.append([version, argv[0], "del", *argv[2:]])
        found = routing_leftovers(topo, before)
        for version in ("-4", "-6"):
            assert any(f"ip {version} rule:" in line and "0x4242" in line for line in found), found
            assert any(f"ip {version} table {table}: local default" in ln for ln in found), found
        assert len(found) == 4, found
    finally:
        for argv in reversed(added):
            topo.c.ip(*argv)
    assert routing_leftovers(topo, before) == []


@pytest.mark.parametrize("host", [S_ADDR_C, S_ADDR6_C])
@pytest.mark.parametrize("login", ["user", "user2", "root"])
def test_ssh_key_login_from_the_client_host(topo: Topology, login: str, host: str) -> None:
    user = topo.user2 if login == "user2" else topo.user
    name = {"user": topo.user.name, "user2": topo.user2.name, "root": "root"}[login]
    result = topo.ssh(name, ["id", "-un"], user=user, host=host)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == name


def test_second_user(topo: Topology, second_user: LocalUser) -> None:
    """Another uid, whose supplementary groups include the first user's (firewalld's) group."""
    assert topo.user2 == second_user
    assert topo.user2.uid != topo.user.uid
    ids = topo.run_as_user(["id"], user=topo.user2, check=True).stdout
    assert f"uid={topo.user2.uid}(" in ids
    assert f"{topo.user.gid}({topo.user.group})" in ids.split("groups=")[1]
    assert topo.home(topo.user2).dir.stat().st_uid == topo.user2.uid
    # Each user can read only its own key.
    other_key = topo.run_as_user(["cat", str(topo.home(topo.user).key)], user=topo.user2)
    assert other_key.returncode != 0


@pytest.mark.parametrize("who", ["user", "user2"])
def test_user_venv_runs_as_the_test_user(topo: Topology, user_venv: UserVenv, who: str) -> None:
    code = "import shuttle_client, shuttle_firewalld, shuttle_agent, shuttle_protocol"
    user = topo.user if who == "user" else topo.user2
    result = topo.run_as_user([str(user_venv.bin / "python"), "-c", code], user=user)
    assert result.returncode == 0, result.stderr


def test_server_python_has_no_msgpack(topo: Topology) -> None:
    """The agent must not rely on the server's packages: /usr/bin/python3 has no msgpack."""
    result = topo.ssh(topo.user.name, [SYSTEM_PYTHON, "-c", "import msgpack"])
    assert result.returncode != 0
    assert "No module named 'msgpack'" in result.stderr


def test_teardown_leaves_nothing(local_user: object) -> None:
    with Topology.up() as topology:
        names = [ns.name for ns in topology.namespaces]
        assert set(names) <= set(list_namespaces())
        run_dir = topology.run_dir
    assert not set(names) & set(list_namespaces())
    assert not run_dir.exists()
    assert not topology.leftovers()

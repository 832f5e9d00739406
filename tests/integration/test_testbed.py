"""The test network itself, without shuttle: what the other integration tests rely on."""

from __future__ import annotations

import pytest

from testbed import (
    BULK_PORT,
    ECHO_PORT,
    HTTP_PORT,
    SYSTEM_PYTHON,
    T_ADDR,
    Topology,
    UserVenv,
    shuttle_rules,
)
from testbed.netns import list_namespaces

pytestmark = pytest.mark.integration


def test_target_is_unreachable_from_the_client_host(topo: Topology) -> None:
    result = topo.curl(T_ADDR, HTTP_PORT, max_time=2)
    # 28: timed out. The packet is routed to S and dropped there, not rejected.
    assert result.returncode == 28, result.stderr
    assert topo.s.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"
    assert not shuttle_rules(topo)


def test_servers_answer_from_the_ssh_server(topo: Topology) -> None:
    page = topo.s.run(["curl", "-sS", "--max-time", "5", f"http://{T_ADDR}:{HTTP_PORT}/"])
    assert page.returncode == 0, page.stderr
    assert topo.marker in page.stdout
    echo = topo.tcptool("echo", T_ADDR, str(ECHO_PORT), "20", timeout=30, ns=topo.s)
    assert echo["ok"], echo
    size = str(1 << 20)
    for direction in ("up", "down"):
        bulk = topo.tcptool(direction, T_ADDR, str(BULK_PORT), size, "seed", timeout=30, ns=topo.s)
        assert bulk["ok"], bulk


@pytest.mark.parametrize("login", ["user", "root"])
def test_ssh_key_login_from_the_client_host(topo: Topology, login: str) -> None:
    name = topo.user.name if login == "user" else "root"
    result = topo.ssh(name, ["id", "-un"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == name


def test_user_venv_runs_as_the_test_user(topo: Topology, user_venv: UserVenv) -> None:
    code = "import shuttle_client, shuttle_firewalld, shuttle_agent, shuttle_protocol"
    result = topo.run_as_user([str(user_venv.bin / "python"), "-c", code])
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

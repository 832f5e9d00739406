"""-N (--auto-nets) and -H (--auto-hosts): what the agent finds on the server's side, used
on the client host: S's routes captured with no subnet given, S's /etc/hosts names written
into firewalld's hosts file (a file of the test's, never the machine's /etc/hosts)."""

from __future__ import annotations

from pathlib import Path

import pytest

import testbed
from testbed import (
    HTTP_PORT,
    S_ADDR_C,
    T_ADDR,
    T_ADDR6,
    TARGET_NET,
    TARGET_NET6,
    Shuttle,
    ready_line,
)
from testbed.config import CLIENT_NET, S_HOSTS
from testbed.procs import wait_until

pytestmark = pytest.mark.integration


def test_auto_nets_captures_the_servers_routes(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    client = shuttle.start_client(subnets=(), extra=["-N"])
    ready = ready_line(client)
    assert TARGET_NET in ready and TARGET_NET6 in ready, ready
    for host in (T_ADDR, T_ADDR6):
        result = topo.curl(host, HTTP_PORT, max_time=20)
        assert result.returncode == 0, f"{result.stderr}\n{shuttle.outputs()}"
        assert topo.marker in result.stdout


def test_a_hostile_agents_routes_over_everything_are_not_captured(shuttle: Shuttle) -> None:
    agent = install_hostile_agent(shuttle, "routes")
    client = shuttle.start_client(python=str(agent), subnets=(), extra=["-N"])
    # Only the target network: not the halves of each family (which would capture all),
    # nor the /16 over C's own link to S (198.18.1.0/24).
    assert ready_line(client).startswith(f"shuttle-client: ready: capturing {TARGET_NET} through")
    skipped = (
        "not capturing 3 of the server's routes: 128.0.0.0/1 (shorter than /8), 8000::/1 "
        f"(shorter than /16), 198.18.0.0/16 (overlaps this host's {CLIENT_NET})"
    )
    assert skipped in client.output(), client.output()
    assert shuttle.stop_client(client) == 0


def hosts_block(shuttle: Shuttle) -> list[str]:
    """The non-comment lines of firewalld's hosts file."""
    if not shuttle.hosts_file.exists():
        return []
    lines = shuttle.hosts_file.read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def names_in(lines: list[str]) -> set[tuple[str, str]]:
    return {(name, line.split()[0]) for line in lines for name in line.split()[1:]}


def test_auto_hosts_writes_the_servers_names_and_removes_them(shuttle: Shuttle) -> None:
    shuttle.stop_firewalld()
    shuttle.write_policy(f"allow {shuttle.topo.user.name} hosts\n")
    shuttle.start_firewalld()
    client = shuttle.start_client(extra=["-H"])
    wanted = set(S_HOSTS)
    assert wait_until(lambda: wanted <= names_in(hosts_block(shuttle)), 20, interval=0.2), (
        f"{hosts_block(shuttle)}\n{shuttle.outputs()}"
    )
    # Only names from the server's side: not its localhost lines.
    assert all(
        name not in ("localhost", "ip6-localhost") for name, _ in names_in(hosts_block(shuttle))
    )
    assert shuttle.stop_client(client) == 0
    assert wait_until(lambda: not hosts_block(shuttle), 10, interval=0.2), hosts_block(shuttle)


def test_auto_hosts_without_permission_is_refused_and_the_tunnel_still_works(
    shuttle: Shuttle,
) -> None:
    client = shuttle.start_client(extra=["-H"])
    refused = "cannot add host names to the hosts file"
    assert wait_until(lambda: refused in client.output(), 20, interval=0.2), shuttle.outputs()
    assert "policy" in client.output(), client.output()
    assert hosts_block(shuttle) == []
    result = shuttle.topo.curl(T_ADDR, HTTP_PORT, max_time=20)
    assert result.returncode == 0, f"{result.stderr}\n{shuttle.outputs()}"


ADMIN_LINES = "127.0.0.1 localhost\n198.18.9.9 bank.shuttle.test\n"
SSH_SERVER_NAME = "ssh-server.shuttle.test"


def install_hostile_agent(shuttle: Shuttle, mode: str) -> Path:
    """A copy of testbed/hostile_agent.py that S runs in place of python (see its docstring)."""
    path = shuttle.topo.run_dir / "tools" / f"agent-{mode}"
    source = Path(testbed.__file__).with_name("hostile_agent.py").read_text()
    path.write_text(f"#!{shuttle.venv.bin / 'python'}\n{source}")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("mode", ["invalid", "shadowing"])
def test_a_hostile_agent_gets_no_bad_name_into_the_hosts_file(shuttle: Shuttle, mode: str) -> None:
    shuttle.stop_firewalld()
    shuttle.write_policy(f"allow {shuttle.topo.user.name} hosts\n")
    shuttle.hosts_file.write_text(ADMIN_LINES)
    shuttle.start_firewalld()
    agent = install_hostile_agent(shuttle, mode)
    # The client connects to S by a name, which the agent then claims too.
    shuttle.topo.c.write_etc("hosts", f"127.0.0.1 localhost\n{S_ADDR_C} {SSH_SERVER_NAME}\n")
    client = shuttle.start_client(python=str(agent), remote_name=SSH_SERVER_NAME, extra=["-H"])
    if mode == "invalid":
        # The client refuses the message and ends that session: nothing reaches firewalld.
        # It reconnects (the agent may have been struck by a passing fault), and as the new
        # one fails at once too, it backs off further each time rather than starting over.
        assert client.wait_for_line("shuttle-client: reconnecting agent in 2 s", 30), (
            shuttle.outputs()
        )
        assert "invalid Hosts" in client.output(), client.output()
        assert shuttle.hosts_file.read_text() == ADMIN_LINES
        assert shuttle.stop_client(client) == 0
    else:
        # Valid names, but the file has them already (root's lines): only the new one goes in.
        wanted = {("new.shuttle.test", "198.18.2.2")}
        assert wait_until(lambda: wanted <= names_in(hosts_block(shuttle)), 20, interval=0.2), (
            f"{shuttle.hosts_file.read_text()}\n{shuttle.outputs()}"
        )
        assert names_in(hosts_block(shuttle)) - names_in(ADMIN_LINES.splitlines()) == wanted
        assert shuttle.hosts_file.read_text().startswith(ADMIN_LINES)
        assert "the server gave an address for its own name SSH-Server.shuttle.test" in (
            client.output()
        )
        assert shuttle.stop_client(client) == 0
    assert wait_until(lambda: shuttle.hosts_file.read_text() == ADMIN_LINES, 10, interval=0.2)
    assert shuttle.firewalld is not None and shuttle.firewalld.alive()

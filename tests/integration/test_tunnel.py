"""Traffic through the tunnel: shuttle-client as the test user, firewalld as root, in C."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import List, Optional

import pytest

from testbed import (
    BULK_PORT,
    CLOSED_PORT,
    ECHO_PORT,
    HTTP_PORT,
    SYSTEM_PYTHON,
    T_ADDR,
    T_ADDR2,
    TARGET_NET,
    TPROXY,
    Shuttle,
    ready_line,
    shuttle_rules,
)

from .checks import start_tproxy

pytestmark = pytest.mark.integration

BULK_BYTES = 100 * 1024 * 1024
PYENV = Path("/root/.pyenv/versions")


def test_page_through_tunnel_only(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    before = topo.curl(T_ADDR, HTTP_PORT, max_time=2)
    assert before.returncode == 28, f"without shuttle the target must time out: {before.stderr}"
    shuttle.start_client()
    assert shuttle_rules(topo), "no SHUTTLE rules while the client runs"
    result = topo.curl(T_ADDR, HTTP_PORT, max_time=20)
    assert result.returncode == 0, f"{result.stderr}\n{shuttle.outputs()}"
    assert topo.marker in result.stdout


def start(shuttle: Shuttle, method: Optional[str]) -> None:
    """The client with the default method, or with tproxy (its transparent sockets)."""
    if method == TPROXY:
        start_tproxy(shuttle, subnets=[TARGET_NET])
    else:
        shuttle.start_client()


# tproxy carries the same TCP another way (sockets firewalld makes): the bulk down and the
# echoes again through it.
@pytest.mark.parametrize(
    ("method", "direction"),
    [(None, "up"), (None, "down"), (TPROXY, "down")],
    ids=["up", "down", "tproxy-down"],
)
def test_bulk_100mb_is_byte_exact(shuttle: Shuttle, method: Optional[str], direction: str) -> None:
    start(shuttle, method)
    result = shuttle.topo.tcptool(
        direction, T_ADDR, str(BULK_PORT), str(BULK_BYTES), f"bulk-{direction}", timeout=300
    )
    assert result["ok"], f"{result}\n{shuttle.outputs()}"
    if direction == "down":
        assert result["bytes"] == BULK_BYTES


@pytest.mark.parametrize("method", [None, TPROXY], ids=["default", "tproxy"])
def test_200_simultaneous_echo_connections(shuttle: Shuttle, method: Optional[str]) -> None:
    start(shuttle, method)
    result = shuttle.topo.tcptool("echo", T_ADDR, str(ECHO_PORT), "200", timeout=120)
    assert result["ok"], f"{result}\n{shuttle.outputs()}"
    assert result["good"] == 200


def test_closed_port_is_refused_locally(shuttle: Shuttle) -> None:
    shuttle.start_client()
    result = shuttle.topo.curl(T_ADDR, CLOSED_PORT, max_time=20)
    # 7: could not connect; 56 (recv) or 55 (send): reset after the local accept. Not 52, an
    # empty reply, which is what a silent EOF instead of a reset would look like.
    assert result.returncode in (7, 55, 56), f"exit {result.returncode}: {result.stderr}"
    # The reset can arrive before curl has checked its connect (the tunnel's round trip here
    # is well under a millisecond); curl 7.88 then says only "Couldn't connect to server".
    words = ("refused", "reset") + (("couldn't connect",) if result.returncode == 7 else ())
    assert any(word in result.stderr.lower() for word in words), result.stderr


def test_excluded_subnet_is_not_captured(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    shuttle.start_client(subnets=[TARGET_NET], excludes=[f"{T_ADDR}/32"])
    excluded = topo.curl(T_ADDR, HTTP_PORT, max_time=2)
    assert excluded.returncode == 28, f"excluded address was not left alone: {excluded}"
    included = topo.curl(T_ADDR2, HTTP_PORT, max_time=20)  # same host, captured address
    assert included.returncode == 0, f"{included.stderr}\n{shuttle.outputs()}"
    assert topo.marker in included.stdout


def test_agent_on_server_python_without_msgpack(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    probe = topo.ssh(topo.user.name, [SYSTEM_PYTHON, "-c", "import msgpack"])
    assert probe.returncode != 0, "the server python has msgpack: this test would prove nothing"
    shuttle.start_client(python=SYSTEM_PYTHON)
    result = topo.curl(T_ADDR, HTTP_PORT, max_time=20)
    assert result.returncode == 0, f"{result.stderr}\n{shuttle.outputs()}"
    assert topo.marker in result.stdout


def newest_python38() -> Path | None:
    """The newest pyenv 3.8.x interpreter, if any."""
    found = []
    for version in PYENV.glob("3.8.*") if PYENV.is_dir() else []:
        parts = version.name.split(".")
        python = version / "bin" / "python3.8"
        if len(parts) == 3 and parts[2].isdigit() and python.exists():
            found.append((int(parts[2]), python))
    return max(found)[1] if found else None


def test_agent_on_oldest_supported_python(shuttle: Shuttle) -> None:
    python = newest_python38()
    if python is None:
        pytest.skip(f"no Python 3.8.x under {PYENV}: cannot run the agent on 3.8")
    topo = shuttle.topo
    # /root is 0700, so this python is usable only by root: log in as root on S.
    probe = topo.ssh("root", [str(python), "-c", "import sys; print(sys.version_info[:2])"])
    assert probe.stdout.strip() == "(3, 8)", probe.stderr
    shuttle.start_client(login="root", python=str(python))
    result = topo.curl(T_ADDR, HTTP_PORT, max_time=20)
    assert result.returncode == 0, f"{result.stderr}\n{shuttle.outputs()}"
    assert topo.marker in result.stdout


def ssh_children(pid: int) -> List[int]:
    """The ssh processes that the client runs (its children named ssh)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in children if Path(f"/proc/{c}/comm").read_text().strip() == "ssh"]


def test_streams_carry_connections_over_several_ssh_sessions(shuttle: Shuttle) -> None:
    client = shuttle.start_client(extra=["--streams=3"])
    assert "3 streams" in ready_line(client)
    assert len(ssh_children(client.pid)) == 3, shuttle.outputs()
    result = shuttle.topo.tcptool("echo", T_ADDR, str(ECHO_PORT), "60", timeout=120)
    assert result["ok"] and result["good"] == 60, f"{result}\n{shuttle.outputs()}"
    page = shuttle.topo.curl(T_ADDR, HTTP_PORT, max_time=20)
    assert page.returncode == 0 and shuttle.topo.marker in page.stdout, page.stderr


def test_without_reconnect_losing_one_of_several_streams_ends_the_client(
    shuttle: Shuttle,
) -> None:
    client = shuttle.start_client(extra=["--streams=2", "--no-reconnect"])
    os.kill(ssh_children(client.pid)[1], signal.SIGKILL)
    assert client.wait(15) == 1, shuttle.outputs()
    shuttle.clients.remove(client)  # its exit code is checked: the teardown must not
    assert "lost the tunnel: agent" in client.output()
    assert not shuttle.wait_rules_gone(), shuttle.outputs()

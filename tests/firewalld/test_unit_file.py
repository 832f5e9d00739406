"""systemd/shuttle-firewalld.service: systemd's own check of it, the directives that matter,
and the real daemon doing a session's work with no more capabilities than the unit leaves."""

from __future__ import annotations

import asyncio
import configparser
import importlib.metadata
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from shuttle_client.firewall_session import FirewallError

from .captures import close_session, open_session
from .conftest import inside
from .daemon import FIREWALLD, Daemon, Listener, nothing_of_shuttle, shuttle_tables
from .traffic import connect

ROOT = Path(__file__).parents[2]
UNIT = ROOT / "systemd" / "shuttle-firewalld.service"


def service() -> configparser.SectionProxy:
    """The unit's [Service] section (each directive appears once there)."""
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep the case
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def test_systemd_finds_nothing_wrong(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing (make dev puts systemd there)"
    # verify checks that the command exists: point it at the one installed here.
    unit = tmp_path / UNIT.name
    exec_start = shlex.split(service()["ExecStart"])[0]
    unit.write_text(UNIT.read_text().replace(exec_start, FIREWALLD))
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stderr) == (0, "")


def test_it_runs_the_console_script_as_a_notify_service() -> None:
    unit = service()
    assert unit["Type"] == "notify"
    command = shlex.split(unit["ExecStart"])
    [script] = importlib.metadata.entry_points(group="console_scripts", name=Path(command[0]).name)
    assert script.value == "shuttle_firewalld.main:main"
    # The socket is where clients look for it by default, with the group RuntimeDirectory's
    # mode lets reach it.
    assert command[1:] == ["--socket=/run/shuttle/firewalld.sock", "--group=shuttle"]
    assert (unit["RuntimeDirectory"], unit["RuntimeDirectoryMode"]) == ("shuttle", "0755")
    assert "User" not in unit  # root
    # SIGTERM to firewalld only, so the tools it runs while removing rules are not killed.
    assert (unit["KillMode"], unit["KillSignal"]) == ("mixed", "SIGTERM")
    assert 10 <= int(unit["TimeoutStopSec"]) <= 90
    # The hosts file is replaced by a rename in its directory.
    assert unit["ProtectSystem"] == "strict"
    assert "/etc" in unit["ReadWritePaths"].split()


def bounding_set() -> str:
    """The unit's CapabilityBoundingSet, as setpriv's --bounding-set takes it."""
    names = [
        name.removeprefix("CAP_").lower() for name in service()["CapabilityBoundingSet"].split()
    ]
    return ",".join(["-all", *(f"+{name}" for name in names)])


@pytest.mark.integration
@pytest.mark.parametrize("method", ["nft", "nat"])
def test_the_unit_leaves_enough_capabilities_for_a_session(
    routed: str,
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
    method: str,
) -> None:
    netns = routed
    # As systemd would start it: only these capabilities, no new privileges; the socket's
    # group is not root's own (it takes CAP_CHOWN to give it).
    wrap = ["setpriv", f"--bounding-set={bounding_set()}", "--no-new-privs"]
    daemon = start_firewalld(group="nogroup", wrap=wrap)
    listen(12300)
    client, applied = open_session(daemon, method, 12300, [("198.18.0.0/15", 80, 80)], [])
    try:
        assert applied == method
        assert connect(netns, [("198.18.0.5", 80)]) == ["connected"]
        asyncio.run(client.set_hosts([("db1", "198.18.0.7")]))
        assert "198.18.0.7 db1\n" in daemon.hosts_file.read_text()
    finally:
        close_session(client)
    assert nothing_of_shuttle(netns)
    assert "db1" not in daemon.hosts_file.read_text()


@pytest.mark.integration
def test_the_unit_leaves_enough_capabilities_for_tproxy(
    routed: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    netns = routed
    wrap = ["setpriv", f"--bounding-set={bounding_set()}", "--no-new-privs"]
    daemon = start_firewalld(wrap=wrap)
    client, _ = open_session(daemon, "tproxy", 1, [("198.18.0.0/15", 1, 65535)], [])
    try:
        assert shuttle_tables(netns) != []
        _, sockets = asyncio.run(client.tproxy_sockets())
        # A reply socket at port 53: below 1024, so it takes CAP_NET_BIND_SERVICE.
        listen(40000, addresses=("0.0.0.0",), protocol="udp")  # the flow's program
        with asyncio.run(client.reply_socket("198.18.0.5", 53, ("198.18.0.1", 40000))) as reply:
            assert reply.getsockname()[:2] == ("198.18.0.5", 53)
        for sock in sockets.values():
            sock.close()
    finally:
        close_session(client)
    assert shuttle_tables(netns) == []


@pytest.mark.integration
def test_the_unit_refuses_a_caller_of_another_namespace_in_one_line(
    netns: str, start_firewalld: Callable[..., Daemon]
) -> None:
    """Entering another namespace takes CAP_SYS_ADMIN, which the unit does not leave: the
    caller is told so, and nothing goes in either namespace (docs/firewalld.md)."""
    wrap = ["setpriv", f"--bounding-set={bounding_set()}", "--no-new-privs"]
    daemon = start_firewalld(wrap=wrap)
    other = f"shuttle-fwt-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", other], check=True, timeout=10)
    try:
        with inside(f"/run/netns/{other}"), pytest.raises(FirewallError) as refused:
            open_session(daemon, "nft", 12300, [("198.18.0.0/15", 80, 80)], [])
        assert str(refused.value) == (
            "shuttle-firewalld: cannot enter the network namespace of the calling process: "
            "Operation not permitted"
        )
        assert nothing_of_shuttle(other) and nothing_of_shuttle(netns)
    finally:
        subprocess.run(["ip", "netns", "del", other], check=False, timeout=10)
    assert daemon.proc.poll() is None

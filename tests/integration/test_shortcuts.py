"""Shortcuts (client/shuttle_client/shortcuts.py): a destination that HOT_AFTER forwards
reached goes straight to a forward of the master's own, through firewalld's rule, so that
ssh accepts its connections itself; what that keeps (byte-exact transfers, the overflow
past the cap, a reset when the master dies, the next master after it) and what it does
not let in (another user of this machine)."""

from __future__ import annotations

import os
import signal
from typing import Any, List, Sequence

import pytest
from shuttle_client.shortcuts import HOT_AFTER

from testbed import BULK_PORT, ECHO_PORT, SYSTEM_PYTHON, T_ADDR, T_ADDR6, TARGET_NET6, Shuttle
from testbed.procs import wait_until
from testbed.shuttle import TARGET_NET

from .checks import RECONNECTED, received
from .ctl import ctl_json
from .test_fastpath import curl_works, last_json, ssh_processes
from .test_firewalld_restart import BACK, restart_firewalld

pytestmark = pytest.mark.integration

DOWNLOAD = ("down", str(BULK_PORT), "1000", "seed")  # a small download from the bulk port
ECHO = ("echo", str(ECHO_PORT), "1")  # one connection's echo


def make_hot(shuttle: Shuttle, check: Sequence[str] = DOWNLOAD, host: str = T_ADDR) -> List[Any]:
    """Checks of one port of host (tcptool's: the name, then the port and its arguments),
    one after another, until the client has made a shortcut for it (HOT_AFTER of them must
    go through ssh; on a loaded machine a few take the agent, so up to three times that);
    the shortcut, as `ctl status` lists it: [host, port, local port]."""
    name, port, *args = check

    def listed() -> List[Any]:
        return list(ctl_json(shuttle, "status")["shortcuts"])

    for done in range(1, 3 * HOT_AFTER + 1):
        result = shuttle.topo.tcptool(name, host, port, *args, timeout=30)
        assert result["ok"], f"{result}\n{shuttle.outputs()}"
        if done >= HOT_AFTER and listed():
            break
    assert wait_until(lambda: bool(listed()), 10), shuttle.outputs()
    (shortcut,) = listed()
    assert shortcut[:2] == [host, int(port)]
    return shortcut


def redirects_to(shuttle: Shuttle, port: int) -> bool:
    """Whether a rule in C's firewall (nft's, or iptables' nat table) redirects to port."""
    c = shuttle.topo.c
    text = c.run(["nft", "list", "ruleset"], timeout=15).stdout
    text += c.run(["iptables-save", "-t", "nat"], timeout=15).stdout
    return f"redirect to :{port}" in text or f"--to-ports {port}" in text


def ssh_listens_on(shuttle: Shuttle, port: int) -> bool:
    out = shuttle.topo.c.run(["ss", "-Hltnp", f"sport = :{port}"], timeout=15).stdout
    return '"ssh"' in out


@pytest.mark.parametrize("method", ["nft", "nat"])
def test_a_hot_destination_goes_straight_to_ssh_byte_exact(shuttle: Shuttle, method: str) -> None:
    shuttle.start_client(method=method)
    _, _, local = make_hot(shuttle)
    assert ssh_listens_on(shuttle, local), shuttle.outputs()
    assert redirects_to(shuttle, local), shuttle.outputs()
    for direction in ("up", "down"):
        size = str(20 * 1024 * 1024)
        result = shuttle.topo.tcptool(direction, T_ADDR, str(BULK_PORT), size, "s", timeout=120)
        assert result["ok"], f"{result}\n{shuttle.outputs()}"
        if direction == "down":
            assert result["bytes"] == int(size)


def test_an_ipv6_destination_gets_its_shortcut_on_ipv6_loopback(shuttle: Shuttle) -> None:
    shuttle.start_client(subnets=(TARGET_NET, TARGET_NET6))
    _, _, local = make_hot(shuttle, host=T_ADDR6)
    out = shuttle.topo.c.run(["ss", "-Hltnp", f"sport = :{local}"], timeout=15).stdout
    assert "[::1]" in out and '"ssh"' in out, out
    result = shuttle.topo.tcptool("down", T_ADDR6, str(BULK_PORT), "100000", "s", timeout=60)
    assert result["ok"], f"{result}\n{shuttle.outputs()}"


def test_past_the_limit_connections_come_to_the_client_and_all_echo(shuttle: Shuttle) -> None:
    """--tcp-cap 5: about five at once through the shortcut (the kernel's count lags by
    milliseconds), five through the client's hand-over, the rest through the agent; this
    checks that the overflow loses none of them."""
    shuttle.start_client(extra=["--tcp-cap=5"])
    make_hot(shuttle, ECHO)
    echo = shuttle.topo.tcptool("echo", T_ADDR, str(ECHO_PORT), "200", timeout=120)
    assert echo["ok"] and echo["good"] == 200, f"{echo}\n{shuttle.outputs()}"


def test_a_killed_master_resets_the_shortcuts_connections_and_takes_its_rule(
    shuttle: Shuttle,
) -> None:
    topo = shuttle.topo
    client = shuttle.start_client(extra=["--keepalive=1"])
    _, _, local = make_hot(shuttle)
    argv = [str(topo.tcptool_path), "down", T_ADDR, str(BULK_PORT), str(2**34), "seed"]
    transfer = topo.start("transfer", topo.user_argv([SYSTEM_PYTHON, *argv, "--timeout", "60"]))
    assert wait_until(lambda: received(topo, BULK_PORT) > 2**20, 30), transfer.output()
    listed = ctl_json(shuttle, "connections")["connections"]
    assert not [c for c in listed if c["port"] == BULK_PORT], listed  # ssh's, not ours
    for pid in ssh_processes(topo):
        os.kill(pid, signal.SIGKILL)
    assert transfer.wait(30) not in (0, None), f"the transfer should break\n{transfer.output()}"
    # A reset (the listener's SO_LINGER 0, which its connections inherit), not a clean EOF.
    assert "ConnectionResetError" in last_json(transfer.output()).get("error", ""), (
        transfer.output()
    )
    assert client.wait_for_line(RECONNECTED, 30), shuttle.outputs()
    assert wait_until(lambda: not ctl_json(shuttle, "status")["shortcuts"], 10)
    assert not redirects_to(shuttle, local)
    curl_works(shuttle)


def test_another_user_cannot_connect_to_the_shortcuts_port(shuttle: Shuttle) -> None:
    shuttle.start_client()
    _, _, local = make_hot(shuttle)
    probe = (
        "import socket,sys\n"
        "s=socket.socket()\n"
        "s.settimeout(5)\n"
        "try:\n"
        f"    s.connect(('127.0.0.1',{local})); s.sendall(b'DOWN 10 x\\n'); d=s.recv(10)\n"
        "    print('got', len(d))\n"
        "except (ConnectionRefusedError, ConnectionResetError) as e:\n"
        "    print('refused', type(e).__name__)\n"
    )
    topo = shuttle.topo
    other = topo.run_as_user([SYSTEM_PYTHON, "-c", probe], timeout=30, user=topo.user2)
    assert other.stdout.startswith("refused"), other.stdout + other.stderr
    mine = topo.run_as_user([SYSTEM_PYTHON, "-c", probe], timeout=30)
    assert mine.stdout.startswith("got 10"), mine.stdout + mine.stderr


def test_no_shortcuts_keeps_every_connection_on_the_hand_over(shuttle: Shuttle) -> None:
    shuttle.start_client(extra=["--no-shortcuts"])
    for _ in range(HOT_AFTER + 4):
        result = shuttle.topo.tcptool("echo", T_ADDR, str(ECHO_PORT), "1", timeout=30)
        assert result["ok"], f"{result}\n{shuttle.outputs()}"
    # make_hot's shortcut shows within moments of the same checks: give it as long as that.
    assert not wait_until(lambda: bool(ctl_json(shuttle, "status")["shortcuts"]), 3)


def test_excluding_a_shortcuts_destination_drops_it_and_its_forward(shuttle: Shuttle) -> None:
    """A route change (ctl add -x) that stops capturing the destination: firewalld drops the
    rule, and the client drops the shortcut and closes ssh's forward."""
    shuttle.start_client()
    _, _, local = make_hot(shuttle)
    ctl_json(shuttle, "add", "-x", f"{T_ADDR}/32:{BULK_PORT}")
    assert wait_until(lambda: not ctl_json(shuttle, "status")["shortcuts"], 10), shuttle.outputs()
    assert wait_until(lambda: not ssh_listens_on(shuttle, local), 10), shuttle.outputs()
    assert not redirects_to(shuttle, local)


def test_a_lost_firewall_session_closes_the_forwards_and_the_new_one_gets_its_own(
    shuttle: Shuttle,
) -> None:
    """firewalld stopped (its rules, guards too, go with it): the client closes ssh's
    forwards at once, for nothing guards them now; on the reopened session the destination
    becomes hot again and gets a new shortcut."""
    client = shuttle.start_client()
    _, _, local = make_hot(shuttle)
    restart_firewalld(shuttle, signal.SIGTERM)
    assert wait_until(lambda: BACK in client.output(), 30), shuttle.outputs()
    assert wait_until(lambda: not ssh_listens_on(shuttle, local), 10), shuttle.outputs()
    _, _, again = make_hot(shuttle)
    assert redirects_to(shuttle, again), shuttle.outputs()

"""A client in another network namespace than firewalld's: a named namespace N with a veth
to the server S (its own way to sshd; the target stays out of reach but through the tunnel),
firewalld running in C. The client in N, as the test user already inside (`ip netns exec`)
and as root with --namespace N, gets its rules in N, none in firewalld's C, and curl from N
reaches the target (with each method; with tproxy, UDP too); once it exits, nothing is left
in either. Host names among root's SUBNETs resolve in N, where it runs. A namespace whose
name is deleted under a session still ends cleanly, and firewalld goes on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path
from typing import List

import pytest

from testbed import HTTP_PORT, S_ADDR_C, T_ADDR, Shuttle, Topology, UserVenv, leftovers
from testbed.config import C_RESOLVER, DNS_ANSWER, DNS_NAME
from testbed.netns import Namespace
from testbed.procs import Proc, wait_until
from testbed.servers import DNS_PORT, dnsmasq_argv
from testbed.shuttle import CLIENT_READY, READY_TIMEOUT
from testbed.topology import curl_argv

from .checks import TUNNEL_WAIT, rules_in

pytestmark = pytest.mark.integration

GONE_WAIT = 15.0  # seconds for a client's exit to reach firewalld and its rules to go


def curl_page(topo: Topology, ns: Namespace, as_user: bool, host: str = T_ADDR) -> None:
    """curl in ns, as the test user or root, gets the target's page from host."""
    argv = curl_argv(host, HTTP_PORT, TUNNEL_WAIT)
    if as_user:
        argv = topo.user.argv(argv, topo.user_env())
    done = ns.run(argv, timeout=TUNNEL_WAIT + 15)
    assert done.returncode == 0, done.stderr
    assert topo.marker in done.stdout


def start(shuttle: Shuttle, name: str, argv: List[str]) -> Proc:
    proc = shuttle.topo.start(name, argv)
    shuttle.clients.append(proc)
    assert proc.wait_for_line(CLIENT_READY, READY_TIMEOUT), shuttle.outputs()
    return proc


def stop(shuttle: Shuttle, client: Proc, ns: Namespace) -> None:
    """SIGTERM the client in ns: it exits 0, and neither ns nor C has rules left."""
    client.send(signal.SIGTERM)
    assert client.wait(20) == 0, shuttle.outputs()
    assert wait_until(lambda: rules_in(ns) == [], GONE_WAIT, 0.2), rules_in(ns)
    assert leftovers(shuttle.topo) == []


def test_the_rules_go_in_the_clients_namespace(
    topo: Topology, user_venv: UserVenv, side_ns: Namespace
) -> None:
    shuttle = Shuttle(topo, user_venv)
    firewalld = shuttle.start_firewalld()
    # Beyond the tunnel, N cannot reach the target.
    assert side_ns.run(curl_argv(T_ADDR, HTTP_PORT, 2), timeout=20).returncode != 0

    # The test user, started inside N.
    args = shuttle.client_args(remote=S_ADDR_C)
    env = topo.user_env([str(user_venv.bin)])
    client = start(shuttle, "client-inside", side_ns.argv(topo.user.argv(args, env)))
    assert rules_in(side_ns) != []
    assert leftovers(topo) == [], "firewalld's own namespace got rules"
    curl_page(topo, side_ns, as_user=True)
    stop(shuttle, client, side_ns)

    # Root, started in C, entering N itself.
    client = start(shuttle, "client-root", root_argv(shuttle, side_ns))
    assert rules_in(side_ns) != []
    assert leftovers(topo) == [], "firewalld's own namespace got rules"
    curl_page(topo, side_ns, as_user=False)
    stop(shuttle, client, side_ns)

    # N's name deleted under a live session, then its client killed: the session ends (the
    # rules go with their namespace), and firewalld serves the next client.
    client = start(shuttle, "client-gone", side_ns.argv(topo.user.argv(args, env)))
    inside = side_ns.pids()  # the client and its ssh
    assert client.pid in inside
    side_ns.delete()
    for pid in inside:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert client.wait(10) == -signal.SIGKILL
    assert firewalld.wait_for_line("shuttle-firewalld: no session in network namespace", 20), (
        shuttle.outputs()
    )
    assert firewalld.alive()
    assert "Traceback" not in firewalld.output()
    again = shuttle.start_client()
    assert leftovers(topo) != []
    shuttle.stop_client(again)
    assert shuttle.wait_rules_gone(GONE_WAIT) == []


def root_argv(shuttle: Shuttle, ns: Namespace, *extra: str) -> List[str]:
    """shuttle-client as root in C, with --namespace ns (and extra options), ssh logging in
    to S as the test user."""
    topo = shuttle.topo
    args = shuttle.client_args(remote=S_ADDR_C, login=topo.user.name, extra=extra)
    runtime = tempfile.mkdtemp(prefix="shuttle-root-", dir=topo.run_dir)
    env = {"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": runtime, "HOME": runtime}
    argv = ["env", "-i", *(f"{key}={value}" for key, value in env.items())]
    return topo.c.argv([*argv, *args[:-1], "--namespace", ns.name, args[-1]])


@pytest.mark.parametrize("method", ["nat", "tproxy"])
def test_each_method_works_in_the_clients_namespace(
    topo: Topology, user_venv: UserVenv, side_ns: Namespace, method: str
) -> None:
    shuttle = Shuttle(topo, user_venv)
    shuttle.start_firewalld()
    client = start(shuttle, "client", root_argv(shuttle, side_ns, f"--method={method}"))
    assert f"method {method}" in client.output(), client.output()
    assert rules_in(side_ns) != []
    assert leftovers(topo) == [], "firewalld's own namespace got rules"
    curl_page(topo, side_ns, as_user=False)
    if method == "tproxy":  # UDP too, its answers through reply sockets made in N
        result = topo.udp_echo(T_ADDR, ns=side_ns)
        assert result["ok"], f"{result}\n{shuttle.outputs()}"
    stop(shuttle, client, side_ns)


def test_host_names_resolve_in_the_namespace(
    topo: Topology, user_venv: UserVenv, side_ns: Namespace
) -> None:
    # C's resolver address answers in N alone: a name among the SUBNETs resolves only there.
    side_ns.ip("addr", "add", f"{C_RESOLVER}/32", "dev", "lo")
    topo.procs.append(side_ns.start("dns-n", dnsmasq_argv([C_RESOLVER]), topo.logs / "dns-n.log"))
    assert side_ns.wait_listening(DNS_PORT, udp=True)
    shuttle = Shuttle(topo, user_venv)
    shuttle.start_firewalld()
    argv = root_argv(shuttle, side_ns)
    argv[-1] = DNS_NAME
    client = start(shuttle, "client", argv)
    curl_page(topo, side_ns, as_user=False, host=DNS_ANSWER)
    stop(shuttle, client, side_ns)


def test_a_user_outside_the_namespace_is_told_how(
    topo: Topology, user_venv: UserVenv, side_ns: Namespace
) -> None:
    args = [user_venv.program("shuttle-client"), "-r", "x", "--namespace", side_ns.name, T_ADDR]
    done = topo.run_as_user(args)
    assert done.returncode == 2
    assert done.stderr == (
        f"shuttle-client: error: --namespace {side_ns.name}: only root can enter a network "
        f"namespace; start the client in it instead: sudo ip netns exec {side_ns.name} sudo -u "
        f"{topo.user.name} shuttle-client ...\n"
    )
    assert Path(f"/run/netns/{side_ns.name}").exists()

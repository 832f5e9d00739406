"""The TCP fast path (--tcp=auto): captured connections carried by ssh's own forwarding
through the ControlMaster, the agent taking the rest; and a server that forbids forwarding,
where the same run puts everything on the agent's path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import pytest
from shuttle_client.fastpath import POOL, REFILL_AT

from testbed import (
    BULK_PORT,
    CLOSED_PORT,
    ECHO_PORT,
    HTTP_PORT,
    SYSTEM_PYTHON,
    T_ADDR,
    Shuttle,
    Topology,
    ready_line,
)
from testbed.procs import Dialogue, Proc, wait_until
from testbed.shuttle import CLIENT_READY, shuttle_rules
from testbed.topology import curl_argv

from .checks import RECONNECTED, received
from .ctl import ctl_json

pytestmark = pytest.mark.integration

BULK_BYTES = 100 * 1024 * 1024
FAST = ["--tcp=auto"]
GATE_WAIT = 60  # seconds: the gated python's bound, and the test's
LOADTOOL = Path(__file__).parents[2] / "bench" / "loadtool.py"


def curl_works(shuttle: Shuttle) -> None:
    page = shuttle.topo.curl(T_ADDR, HTTP_PORT, max_time=20)
    assert page.returncode == 0 and shuttle.topo.marker in page.stdout, (
        f"{page.stderr}\n{shuttle.outputs()}"
    )


def ssh_processes(topo: Topology) -> List[int]:
    """The client's ssh (the ControlMaster) in C."""
    return topo.processes_of(topo.c, topo.user, "ssh")


def unix_sockets(pid: int) -> int:
    """The unix sockets among pid's descriptors (its mux listener and mux connections)."""
    unix = set()
    with open(f"/proc/{pid}/net/unix") as table:
        for line in list(table)[1:]:
            unix.add(line.split()[6])
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed since the listing: a forward that ended
            pass
    return sum(1 for link in links if link.startswith("socket:[") and link[8:-1] in unix)


def last_json(output: str) -> Dict[str, Any]:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def test_curl_goes_through_ssh_and_status_says_so(shuttle: Shuttle) -> None:
    client = shuttle.start_client()  # auto is the default
    assert "TCP through ssh" in ready_line(client), shuttle.outputs()
    assert ctl_json(shuttle, "status")["tcp"] == "ssh"
    curl_works(shuttle)


def test_the_master_keeps_mux_connections_ready_and_refills_them(shuttle: Shuttle) -> None:
    """A hand-over takes a connection that is already past its Hellos, and the pool refills
    once it is down to REFILL_AT: the master holds its listener, the watch connection and
    the ready ones (POOL after a refill; the start's probe may have taken one since)."""
    shuttle.start_client(extra=FAST)
    (master,) = ssh_processes(shuttle.topo)

    def ready() -> int:
        return unix_sockets(master) - 2

    assert wait_until(lambda: REFILL_AT < ready() <= POOL, 10), ready()
    before = ready()
    for _ in range(before - REFILL_AT - 1):
        curl_works(shuttle)
    assert wait_until(lambda: ready() == REFILL_AT + 1, 10), ready()
    curl_works(shuttle)  # the pool is down to REFILL_AT: refilled
    assert wait_until(lambda: ready() == POOL, 10), ready()


@pytest.mark.parametrize("direction", ["up", "down"])
def test_bulk_100mb_is_byte_exact(shuttle: Shuttle, direction: str) -> None:
    shuttle.start_client(extra=FAST)
    result = shuttle.topo.tcptool(
        direction, T_ADDR, str(BULK_PORT), str(BULK_BYTES), f"bulk-{direction}", timeout=300
    )
    assert result["ok"], f"{result}\n{shuttle.outputs()}"
    if direction == "down":
        assert result["bytes"] == BULK_BYTES


@pytest.mark.parametrize("cap", [200, 20], ids=["under-the-cap", "past-the-cap"])
def test_200_simultaneous_echo_connections(shuttle: Shuttle, cap: int) -> None:
    shuttle.start_client(extra=[*FAST, f"--tcp-cap={cap}"])
    result = shuttle.topo.tcptool("echo", T_ADDR, str(ECHO_PORT), "200", timeout=120)
    assert result["ok"], f"{result}\n{shuttle.outputs()}"
    assert result["good"] == 200


def test_a_burst_accepted_in_one_turn_stays_within_the_cap(shuttle: Shuttle) -> None:
    """Hundreds of connections that come at once are accepted in one turn of the loop,
    before any hand-over's task runs: each counts against the cap as it is taken, and the
    rest go through the agent (all are held open, then listed)."""
    topo, cap, burst = shuttle.topo, 20, 600
    shuttle.start_client(extra=[*FAST, f"--tcp-cap={cap}"])
    script = topo.tcptool_path.parent / "loadtool.py"
    shutil.copyfile(LOADTOOL, script)
    argv = [SYSTEM_PYTHON, str(script), "hold", T_ADDR, str(ECHO_PORT), str(burst)]
    holder = Dialogue(topo.user_argv([*argv, "--timeout=60", "--idle=60"]), timeout=90)
    try:
        figures = json.loads(holder.line())
        assert figures["ok"], figures
        listed = ctl_json(shuttle, "connections")["connections"]
    finally:
        holder.close()
    fast = [c for c in listed if c["proto"] == "tcp-ssh"]
    assert 0 < len(fast) <= cap and len(listed) >= burst, (len(fast), len(listed))


def test_closed_port_is_refused_or_reset(shuttle: Shuttle) -> None:
    shuttle.start_client(extra=FAST)
    result = shuttle.topo.curl(T_ADDR, CLOSED_PORT, max_time=20)
    # ssh fails the open; the agent's refusal decides: a reset, not an empty reply (52).
    assert result.returncode in (7, 55, 56), f"exit {result.returncode}: {result.stderr}"
    curl_works(shuttle)  # and the path still works after it


def test_a_transfer_lists_as_tcp_ssh_and_a_killed_master_resets_it(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    client = shuttle.start_client(extra=[*FAST, "--keepalive=1"])
    argv = [str(topo.tcptool_path), "down", T_ADDR, str(BULK_PORT), str(2**34), "seed"]
    transfer = topo.start("transfer", topo.user_argv([SYSTEM_PYTHON, *argv, "--timeout", "60"]))
    assert wait_until(lambda: received(topo, BULK_PORT) > 2**20, 30), transfer.output()
    listed = ctl_json(shuttle, "connections")
    fast = [c for c in listed["connections"] if (c["proto"], c["port"]) == ("tcp-ssh", BULK_PORT)]
    assert fast, f"{listed}\n{shuttle.outputs()}"
    assert fast[0]["bytes_down"] > 2**20  # from TCP_INFO of the client's copy
    masters = ssh_processes(topo)
    assert masters, "no ssh in C"
    for pid in masters:
        os.kill(pid, signal.SIGKILL)
    assert transfer.wait(30) not in (0, None), f"the transfer should break\n{transfer.output()}"
    outcome = last_json(transfer.output())
    # A reset, not a clean EOF that would look like a (short) complete transfer.
    assert "ConnectionResetError" in outcome.get("error", ""), transfer.output()
    assert client.wait_for_line(RECONNECTED, 30), shuttle.outputs()
    curl_works(shuttle)
    assert ctl_json(shuttle, "status")["tcp"] == "ssh"


NO_SSH_RESETS = (
    "add table inet norst; "
    "add chain inet norst output { type filter hook output priority 0; }; "
    "add rule inet norst output tcp sport 22 tcp flags & rst == rst drop"
)
# Holds one echoed connection open and prints how it ended once the tunnel goes.
HOLD_ONE = """
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
sock.sendall(b"x")
assert sock.recv(1) == b"x"
print("echoed", flush=True)
try:
    print("eof" if sock.recv(1) == b"" else "data", flush=True)
except ConnectionResetError:
    print("reset", flush=True)
"""


def test_a_server_that_goes_away_resets_the_connections_ssh_carried(shuttle: Shuttle) -> None:
    """sshd's end goes with a FIN: ssh reads the end of its connection, says goodbye, and
    closes every channel's descriptors while it still runs (clientloop.c, channel_free_all),
    before it exits. The program still sees a reset, not a clean end. S drops its own resets
    on port 22: the goodbye always goes out (a reset back would fail its write, and ssh
    would exit at once, which is the other path). Where the client took the master's end
    for a forward's, the program saw a clean end in most runs: whether ssh was already
    exiting when the client looked is a race."""
    topo = shuttle.topo
    topo.s.run(["nft", NO_SSH_RESETS], timeout=10, check=True)
    shuttle.start_client(extra=FAST)
    argv = [SYSTEM_PYTHON, "-c", HOLD_ONE, T_ADDR, str(ECHO_PORT)]
    holder = Dialogue(topo.user_argv(argv), timeout=30)
    try:
        assert holder.line() == "echoed\n"
        assert ctl_json(shuttle, "status")["tcp"] == "ssh"
        sessions = topo.processes_of(topo.s, topo.user, "sshd")
        assert sessions, "no sshd session process in S"
        for pid in sessions:
            os.kill(pid, signal.SIGKILL)
        ended = holder.line()
    finally:
        holder.close()
    assert ended == "reset\n", f"{ended!r}\n{shuttle.outputs()}"


@pytest.mark.parametrize("tcp", ["agent", "auto"])
def test_sigterm_resets_connections_and_leaves_no_ssh_and_no_directory(
    shuttle: Shuttle, tcp: str
) -> None:
    """Stopped with a connection in flight, on either path: the program sees a reset (not a
    clean EOF that would look like a short complete transfer), the client exits 0, its
    masters end, and their directory goes."""
    topo = shuttle.topo
    client = shuttle.start_client(extra=[f"--tcp={tcp}"])
    argv = [str(topo.tcptool_path), "down", T_ADDR, str(BULK_PORT), str(2**34), "seed"]
    transfer = topo.start("transfer", topo.user_argv([SYSTEM_PYTHON, *argv, "--timeout", "60"]))
    assert wait_until(lambda: received(topo, BULK_PORT) > 2**20, 30), transfer.output()
    client.send(signal.SIGTERM)
    assert client.wait(15) == 0, shuttle.outputs()
    assert transfer.wait(30) not in (0, None), f"the transfer should break\n{transfer.output()}"
    assert "ConnectionResetError" in last_json(transfer.output()).get("error", ""), (
        transfer.output()
    )
    assert wait_until(lambda: not ssh_processes(topo), 10), "ssh outlived the client"
    left = list(topo.home().runtime_dir.glob("shuttle-ssh-*"))
    assert not left, f"the masters' directory stayed: {left}"


def test_two_streams_are_two_masters(shuttle: Shuttle) -> None:
    shuttle.start_client(extra=[*FAST, "--streams=2"])
    assert len(ssh_processes(shuttle.topo)) == 2
    status = ctl_json(shuttle, "status")
    assert (status["tcp"], status["streams_up"]) == ("ssh", 2)
    result = shuttle.topo.tcptool("echo", T_ADDR, str(ECHO_PORT), "200", timeout=120)
    assert result["ok"] and result["good"] == 200, f"{result}\n{shuttle.outputs()}"
    curl_works(shuttle)


def test_a_server_without_forwarding_gets_everything_over_the_agent(shuttle: Shuttle) -> None:
    shuttle.topo.start_sshd(tcp_forwarding=False)
    client = shuttle.start_client(extra=FAST)
    assert "TCP through agent" in ready_line(client), shuttle.outputs()
    assert "the server does not forward TCP" in client.output()
    assert ctl_json(shuttle, "status")["tcp"] == "agent"
    curl_works(shuttle)
    result = shuttle.topo.tcptool("echo", T_ADDR, str(ECHO_PORT), "200", timeout=120)
    assert result["ok"] and result["good"] == 200, f"{result}\n{shuttle.outputs()}"
    refused = shuttle.topo.curl(T_ADDR, CLOSED_PORT, max_time=20)
    assert refused.returncode in (7, 55, 56), f"exit {refused.returncode}: {refused.stderr}"


def test_an_ssh_that_refuses_controlmaster_gets_everything_over_the_agent(
    shuttle: Shuttle,
) -> None:
    # The user's own option comes first on ssh's command line, and ssh takes the first.
    ssh = f"{shuttle.topo.ssh_command(shuttle.topo.user)} -o ControlMaster=no"
    client = shuttle.start_client(extra=[*FAST, f"--ssh-cmd={ssh}"])
    assert "TCP through agent" in ready_line(client), shuttle.outputs()
    assert "TCP goes through the agent: ssh is not a ControlMaster" in client.output()
    assert ctl_json(shuttle, "status")["tcp"] == "agent"
    curl_works(shuttle)


def test_tcp_ssh_fails_to_start_where_the_server_does_not_forward(shuttle: Shuttle) -> None:
    shuttle.topo.start_sshd(tcp_forwarding=False)
    topo = shuttle.topo
    env = topo.user_env([str(shuttle.venv.bin)])
    argv = topo.user_argv(shuttle.client_args(extra=["--tcp=ssh"]), env)
    proc = topo.start("client-ssh-only", argv)
    assert proc.wait(60) == 1, proc.output()
    assert "--tcp=ssh, but the server does not forward TCP for this user" in proc.output()
    assert "Traceback" not in proc.output()


@pytest.mark.parametrize("tcp", ["agent", "auto"])
def test_a_local_half_close_gets_the_whole_answer(shuttle: Shuttle, tcp: str) -> None:
    """The program shuts down its sending side and reads the answer: both paths."""
    shuttle.start_client(extra=[f"--tcp={tcp}"])
    size = 2**20
    result = shuttle.topo.tcptool("half-close-local", T_ADDR, str(ECHO_PORT), str(size), timeout=60)
    assert result["ok"] and result["bytes"] == size, f"{result}\n{shuttle.outputs()}"


# The fast path's one difference, stated: OpenSSH drains a stdio forward on the remote's EOF
# and closes both directions, so what the program sends after the server's half-close never
# arrives; the agent's path keeps the directions apart.
@pytest.mark.parametrize(("tcp", "arrived"), [("agent", 100_000), ("auto", 0)])
def test_after_the_servers_half_close(shuttle: Shuttle, tcp: str, arrived: int) -> None:
    topo = shuttle.topo
    shuttle.start_client(extra=[f"--tcp={tcp}"])
    result = topo.tcptool("half-close-remote", T_ADDR, str(BULK_PORT), "100000", timeout=60)
    assert result["ok"], f"{result}\n{shuttle.outputs()}"
    log = topo.logs / "bulk.log"
    line = "after its half-close, bulk read "
    assert wait_until(lambda: line in log.read_text(errors="replace"), 30), shuttle.outputs()
    assert f"{line}{arrived} bytes" in log.read_text(errors="replace")


def gated(topo: Topology, program: str, ungated: str = "") -> tuple[Path, Path]:
    """A script that runs program only once the returned gate file exists (waiting for
    it, bounded), or at once when its arguments hold the word ungated; and the gate."""
    gate = topo.user_dir / f"{os.path.basename(program)}-gate"
    skip = f'case " $* " in *" {ungated} "*) exec {program} "$@";; esac\n' if ungated else ""
    script = topo.write_user_file(
        f"gated-{os.path.basename(program)}",
        f"#!/bin/sh\n{skip}for i in $(seq {GATE_WAIT * 10}); do\n"
        f'  [ -e {gate} ] && exec {program} "$@"\n  sleep 0.1\ndone\nexit 1\n',
    )
    script.chmod(0o700)
    return script, gate


def start_unready(shuttle: Shuttle, **options: Any) -> Proc:
    """A client started, not waited for; with -v: the hand-over's debug line says when
    the agent takes one."""
    topo = shuttle.topo
    extra = [*FAST, "-v", *options.pop("extra", [])]
    env = topo.user_env([str(shuttle.venv.bin)])
    client = topo.start(
        "client-gated", topo.user_argv(shuttle.client_args(extra=extra, **options), env)
    )
    shuttle.clients.append(client)
    return client


def start_gated(shuttle: Shuttle) -> tuple[Proc, Path]:
    """A client whose agent starts only once the returned gate file exists (the server's
    python, C and S share the file system, waits for it); returned once its rules are in
    and it is connected to the master (-v's start-up line): a connection captured before
    that waits for the agent."""
    python, gate = gated(shuttle.topo, SYSTEM_PYTHON)
    client = start_unready(shuttle, python=str(python))
    assert wait_until(lambda: shuttle_rules(shuttle.topo), GATE_WAIT), shuttle.outputs()
    up = "start-up: agent: the master's Hello"
    assert wait_until(lambda: up in client.output(), GATE_WAIT), shuttle.outputs()
    return client, gate


def test_tcp_goes_through_the_master_before_the_agent_has_started(shuttle: Shuttle) -> None:
    """The master is up once ssh has authenticated: the rules and the fast path need not
    wait for the server's python."""
    client, gate = start_gated(shuttle)
    curl_works(shuttle)
    assert CLIENT_READY not in client.output() and not gate.exists()  # no agent yet
    gate.touch()
    assert client.wait_for_line(CLIENT_READY, GATE_WAIT), shuttle.outputs()
    assert "TCP through ssh" in ready_line(client)


def test_before_the_agent_a_server_without_forwarding_holds_connections_for_it(
    shuttle: Shuttle,
) -> None:
    """The master refuses the early connection; it waits for the agent, which carries it."""
    topo = shuttle.topo
    topo.start_sshd(tcp_forwarding=False)
    client, gate = start_gated(shuttle)
    argv = topo.user_argv(curl_argv(T_ADDR, HTTP_PORT, GATE_WAIT))
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=topo.user_dir) as curl:
        assert wait_until(lambda: "through the agent" in client.output(), GATE_WAIT)
        assert curl.poll() is None  # held: the agent has not started
        gate.touch()
        page, _ = curl.communicate(timeout=GATE_WAIT + 15)
    assert curl.returncode == 0 and topo.marker in page, shuttle.outputs()
    assert client.wait_for_line(CLIENT_READY, GATE_WAIT), shuttle.outputs()
    assert "TCP through agent" in ready_line(client)


def test_the_rules_go_in_while_ssh_connects_where_the_excludes_cover_it(shuttle: Shuttle) -> None:
    """The server's address is excluded (ssh -G names it, no ProxyCommand): the rules need
    not wait for ssh's connection, and they do not capture it."""
    topo = shuttle.topo
    ssh, gate = gated(topo, "ssh", ungated="-G")
    options = " ".join(topo.ssh_options(topo.user))
    client = start_unready(shuttle, extra=[f"--ssh-cmd={ssh} {options}"])
    assert wait_until(lambda: shuttle_rules(topo), GATE_WAIT), shuttle.outputs()
    assert not gate.exists()  # ssh has not begun to connect
    gate.touch()
    assert client.wait_for_line(CLIENT_READY, GATE_WAIT), shuttle.outputs()
    assert "TCP through ssh" in ready_line(client)
    curl_works(shuttle)

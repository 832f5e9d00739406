"""The bench's own programs on the test network: its echo server on the target, an iperf3
server per measurement (a one-off server cannot be left busy by a run that broke), and the
delaying relay in front of sshd. The standalone scripts are copied where every user can read
them and run with the system python."""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from testbed.config import S_ADDR_C, SSH_PORT, SYSTEM_PYTHON, T_ADDR
from testbed.procs import Proc
from testbed.topology import Topology

ECHO_PORT = 7100  # the bench's echo server on T (testbed's own is on 7007)
IPERF_PORT = 5201
RELAY_PORT = 2222  # on S, in front of sshd
SCRIPTS = ("loadtool.py", "echoserver.py", "delayrelay.py")
START_TIMEOUT = 15.0
_iperf_runs = itertools.count()


def install(topo: Topology) -> Path:
    """Copy the scripts into the network's directory (the repository may not be readable)."""
    tools = topo.run_dir / "bench"
    tools.mkdir(mode=0o755)
    for name in SCRIPTS:
        target = tools / name
        shutil.copyfile(Path(__file__).with_name(name), target)
        target.chmod(0o644)
    return tools


def start_echo(topo: Topology, tools: Path) -> Proc:
    argv = [SYSTEM_PYTHON, str(tools / "echoserver.py"), T_ADDR, str(ECHO_PORT)]
    proc = topo.start("bench-echo", topo.t.argv(argv))
    if not topo.t.wait_listening(ECHO_PORT, timeout=START_TIMEOUT):
        raise RuntimeError(f"the bench's echo server did not start\n{proc.describe()}")
    return proc


def start_relay(topo: Topology, tools: Path, delay_ms: float) -> Proc:
    """The relay on S's address towards C, RELAY_PORT, to sshd: ssh -p RELAY_PORT uses it."""
    argv = [
        SYSTEM_PYTHON,
        str(tools / "delayrelay.py"),
        S_ADDR_C,
        str(RELAY_PORT),
        S_ADDR_C,
        str(SSH_PORT),
        f"--delay-ms={delay_ms:g}",
    ]
    proc = topo.start("bench-relay", topo.s.argv(argv))
    if not topo.s.wait_listening(RELAY_PORT, timeout=START_TIMEOUT):
        raise RuntimeError(f"the delaying relay did not start\n{proc.describe()}")
    return proc


@contextmanager
def iperf_server(topo: Topology) -> Iterator[None]:
    """A one-off iperf3 server on T for one measurement."""
    name = f"iperf3-{next(_iperf_runs)}"
    proc = topo.t.start(name, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)], topo.logs / name)
    try:
        if not topo.t.wait_listening(IPERF_PORT, timeout=START_TIMEOUT):
            raise RuntimeError(f"iperf3 -s did not start\n{proc.describe()}")
        yield
    finally:
        proc.stop(timeout=5)

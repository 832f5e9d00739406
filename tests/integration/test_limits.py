"""Resource limits in the test network: a flood of connections beyond the client's open-file
limit, and a remote (or local) program that stops reading while the other end sends.

What must hold: the client stays up and keeps serving the connections it has; what it
cannot take is refused with a reset (the program sees it at once) and one clear log line,
not a traceback; and a stalled reader costs the client and the agent a bounded amount of
memory (the channel's credit window, the in-flight cap), while its sender simply blocks and
other connections through the same tunnel go on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

import pytest

from testbed import BULK_PORT, ECHO_PORT, SYSTEM_PYTHON, T_ADDR, Shuttle
from testbed.procs import Proc, wait_until
from testbed.shuttle import CLIENT_READY, READY_TIMEOUT

from .procwatch import HERE, HeldTool, agent_pid, install_tool, rss_kib

pytestmark = pytest.mark.integration

NOFILE = 256  # the client's open-file limit in the flood test, soft and hard
FLOOD = 600  # connections at once: more than the client has descriptors
SINK_PORT = 7011  # limitstool's sink on T: accepts, never reads
# What a stalled channel may cost each process, in KiB. The flow control bounds it: a
# 1 MiB credit window per direction and channel, 512 KiB in flight, 512 KiB in the pipe's
# write buffer; beyond those the reader's kernel buffers hold the rest, not our processes.
# 16 MiB leaves room for the allocator, and a buffer that grew without bound (the test
# offers hundreds of megabytes) would be far past it.
STALL_RSS_GROWTH_KIB = 16 * 1024
# What the stalled sender may get into the tunnel before its send blocks: the kernel's
# buffers on four sockets (autotuned, up to tcp_wmem/tcp_rmem's maxima here: 4 + 32 MiB
# per socket pair), the windows and the pipes. Far less than the gigabyte it offers.
STALL_SENT_MAX = 160 * 1024 * 1024
STALL_DOWN_BYTES = 128 * 1024 * 1024  # what the remote offers a reader that does not read
SIDE_BULK = 8 * 1024 * 1024  # another connection's transfer, each way, during a stall


def start_client_under(shuttle: Shuttle, prefix: Sequence[str], **options: Any) -> Proc:
    """shuttle-client as the test user, its command line behind prefix (prlimit ...)."""
    topo = shuttle.topo
    env = topo.user_env([str(shuttle.venv.bin)])
    argv = topo.user_argv([*prefix, *shuttle.client_args(**options)], env)
    proc = topo.start(f"client{len(shuttle.clients)}", argv)
    shuttle.clients.append(proc)
    if not proc.wait_for_line(CLIENT_READY, READY_TIMEOUT):
        pytest.fail(f"shuttle-client not ready within {READY_TIMEOUT}s\n{shuttle.outputs()}")
    return proc


def limitstool(shuttle: Shuttle) -> Path:
    install_tool(shuttle.topo, HERE / "limitstool.py")
    return shuttle.topo.tcptool_path.parent / "limitstool.py"


def nofile(pid: int) -> int:
    """The soft open-file limit of pid, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open-file limit in /proc/{pid}/limits")


def test_flood_beyond_the_fd_limit_is_refused_and_existing_connections_go_on(
    shuttle: Shuttle,
) -> None:
    topo = shuttle.topo
    tool = limitstool(shuttle)
    client = start_client_under(shuttle, ["prlimit", f"--nofile={NOFILE}:{NOFILE}"])
    assert nofile(client.pid) == NOFILE, "the client is not under the low limit"
    argv = [SYSTEM_PYTHON, str(tool), "flood", T_ADDR, str(ECHO_PORT), str(FLOOD), "--wait", "60"]
    result = topo.run_as_user(argv, timeout=120)
    lines = result.stdout.strip().splitlines()
    outcome: Dict[str, Any] = {"ok": False, "stdout": result.stdout, "stderr": result.stderr}
    if lines:
        outcome = json.loads(lines[-1])
    output = client.output()
    assert client.alive(), f"the client died in the flood\n{shuttle.outputs()}"
    assert outcome["ok"], f"{outcome}\n{output}"
    fates = outcome["fates"]
    print(f"flood of {FLOOD} under --nofile={NOFILE}: {fates}")
    assert set(fates) <= {"echoed", "reset"}, f"{fates}: not all echoed or were reset\n{output}"
    assert fates.get("reset", 0) > 0, f"the flood did not reach the limit: {fates}"
    assert "Traceback" not in output, output
    assert "out of system resource" not in output, output
    warnings = [line for line in output.splitlines() if "too many connections" in line]
    assert warnings and warnings[0].startswith("shuttle-client: too many connections"), output
    print(warnings[0])
    # And the client still serves new connections normally once the flood is gone.
    echo = topo.tcptool("echo", T_ADDR, str(ECHO_PORT), "20", timeout=60)
    assert echo["ok"], f"{echo}\n{shuttle.outputs()}"


def start_sink(shuttle: Shuttle, tool: Path) -> Proc:
    """limitstool's sink on T, on every IPv4 address: accepts, never reads."""
    topo = shuttle.topo
    argv = [SYSTEM_PYTHON, str(tool), "serve-sink", "0.0.0.0", str(SINK_PORT)]
    proc = topo.t.start("sink", argv, topo.logs / "sink.log")
    topo.procs.append(proc)  # stopped at teardown
    assert topo.t.wait_listening(SINK_PORT, timeout=15), proc.describe()
    return proc


def send_queue(shuttle: Shuttle, port: int) -> List[int]:
    """Send-Q of T's established sockets on port (bytes the server's kernel still holds)."""
    out = shuttle.topo.t.run(["ss", "-Htn", "state", "established", f"sport = :{port}"]).stdout
    return [int(line.split()[1]) for line in out.splitlines() if len(line.split()) > 1]


def others_still_work(shuttle: Shuttle, tag: str) -> None:
    """Echoes and a transfer each way on other connections through the same tunnel."""
    topo = shuttle.topo
    echo = topo.tcptool("echo", T_ADDR, str(ECHO_PORT), "10", timeout=60)
    assert echo["ok"], f"echo beside a stalled channel: {echo}\n{shuttle.outputs()}"
    for direction in ("up", "down"):
        seed = f"{tag}-{direction}"
        args = (direction, T_ADDR, str(BULK_PORT), str(SIDE_BULK), seed)
        result = topo.tcptool(*args, timeout=60)
        assert result["ok"], f"{direction} beside a stalled channel: {result}\n{shuttle.outputs()}"


def assert_bounded(before: Dict[str, int], after: Dict[str, int], output: str) -> None:
    for who, rss in after.items():
        growth = rss - before[who]
        assert growth <= STALL_RSS_GROWTH_KIB, (
            f"{who}'s RSS grew by {growth} KiB with a stalled reader "
            f"(bound {STALL_RSS_GROWTH_KIB} KiB): {before} -> {after}\n{output}"
        )


def test_a_remote_that_never_reads_blocks_its_sender_not_the_tunnel(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    tool = limitstool(shuttle)
    start_sink(shuttle, tool)
    client = shuttle.start_client()
    others_still_work(shuttle, "warm-up")  # every buffer the tunnel uses has been used once
    agent = agent_pid(topo)
    before = {"client": rss_kib(client.pid), "agent": rss_kib(agent)}
    argv = [SYSTEM_PYTHON, str(tool), "push", T_ADDR, str(SINK_PORT), "--idle", "3"]
    push = HeldTool(topo, argv)
    try:
        pushed = push.line(timeout=180)
        assert pushed.get("ok") and pushed.get("blocked"), f"{pushed}\n{shuttle.outputs()}"
        assert pushed["sent"] <= STALL_SENT_MAX, f"{pushed}: the sender was not held back"
        stalled = {"client": rss_kib(client.pid), "agent": rss_kib(agent)}
        others_still_work(shuttle, "beside-a-stalled-upload")
        during = {"client": rss_kib(client.pid), "agent": rss_kib(agent)}
        print(f"stalled upload: {pushed['sent']} bytes sent; RSS KiB {before} {stalled} {during}")
        assert_bounded(before, stalled, shuttle.outputs())
        assert_bounded(before, during, shuttle.outputs())
        closed = push.finish(timeout=30)
        assert closed.get("ok"), closed
    finally:
        push.close()
    others_still_work(shuttle, "after-a-stalled-upload")
    assert client.alive(), shuttle.outputs()


def test_a_local_program_that_never_reads_holds_the_remote_not_the_tunnel(
    shuttle: Shuttle,
) -> None:
    topo = shuttle.topo
    tool = limitstool(shuttle)
    client = shuttle.start_client()
    others_still_work(shuttle, "warm-up")
    agent = agent_pid(topo)
    before = {"client": rss_kib(client.pid), "agent": rss_kib(agent)}
    argv = [SYSTEM_PYTHON, str(tool), "hang", T_ADDR, str(BULK_PORT), str(STALL_DOWN_BYTES)]
    hang = HeldTool(topo, [*argv, "stalled-download", "--hold", "300"])
    try:
        holding = hang.line(timeout=30)
        assert holding.get("holding"), f"{holding}\n{shuttle.outputs()}"
        # The remote sender is blocked once its kernel holds bytes that do not move.
        queues: List[List[int]] = []

        def blocked() -> bool:
            queues.append(send_queue(shuttle, BULK_PORT))
            return len(queues) > 1 and bool(queues[-1]) and queues[-1] == queues[-2]

        assert wait_until(blocked, timeout=120, interval=1.0), f"Send-Q: {queues[-5:]}"
        stalled = {"client": rss_kib(client.pid), "agent": rss_kib(agent)}
        others_still_work(shuttle, "beside-a-stalled-download")
        during = {"client": rss_kib(client.pid), "agent": rss_kib(agent)}
        print(f"stalled download: Send-Q {queues[-1]}; RSS KiB {before} {stalled} {during}")
        assert_bounded(before, stalled, shuttle.outputs())
        assert_bounded(before, during, shuttle.outputs())
        hang.send("read\n")
        result = hang.line(timeout=180)
        assert result.get("ok"), f"the held download, read at last: {result}"
    finally:
        hang.close()
    assert client.alive(), shuttle.outputs()

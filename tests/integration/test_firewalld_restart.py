"""firewalld restarts under a running client: stopped (SIGTERM, which removes the rules) or
killed (SIGKILL, whose rules the next start removes), then started again. The client opens
its session again, the same, by itself: a new curl goes through the tunnel, -H names are
back in the hosts file, and `ctl events` tells of the loss and the return. A firewalld that
another member's big request keeps busy for longer than the lease is slow, not gone: the
client keeps its session."""

from __future__ import annotations

import signal
from typing import Callable

import pytest

from testbed import BULK_PORT, METHODS, SYSTEM_PYTHON, T_ADDR, TARGET_NET6, TPROXY, Shuttle
from testbed.config import TARGET_NET
from testbed.procs import Proc, wait_until
from testbed.shuttle import FIREWALLD_READY

from .checks import assert_page, assert_udp_echo, received

pytestmark = pytest.mark.integration

LOST = "shuttle-client: lost the firewall session: "
BACK = "shuttle-client: firewall session open again "
MARKER = "# shuttle session "  # firewalld's hosts block lines begin with it


def hosts_names(shuttle: Shuttle) -> bool:
    """Whether firewalld's hosts file has a session's block with names in it."""
    if not shuttle.hosts_file.exists():
        return False
    text = shuttle.hosts_file.read_text()
    return MARKER in text and any(
        line.strip() and not line.startswith("#") for line in text.splitlines()
    )


def logged(proc: Proc, line: str, times: int) -> Callable[[], bool]:
    """Whether proc has logged line (a prefix) times times."""
    return lambda: proc.output().count(line) == times


def start_download(shuttle: Shuttle) -> Proc:
    """A long download from T through the tunnel, running once a MiB has come."""
    topo = shuttle.topo
    argv = [SYSTEM_PYTHON, str(topo.tcptool_path), "down", T_ADDR, str(BULK_PORT), str(2**34)]
    transfer = topo.start("download", topo.user_argv([*argv, "seed", "--timeout", "60"]))
    assert wait_until(lambda: received(topo, BULK_PORT) > 2**20, 30), (
        f"{transfer.output()}\n{shuttle.outputs()}"
    )
    return transfer


def subscribe(shuttle: Shuttle) -> Proc:
    """`ctl events` running, its subscription known to have reached the client: it printed
    the channel of a connection made after it started."""
    topo = shuttle.topo
    argv = [shuttle.venv.program("shuttle-client"), "ctl", "events"]
    events = topo.start("events", topo.user_argv(argv))
    for _ in range(20):  # when the subscription arrives is not knowable: connect until seen
        assert_page(shuttle, T_ADDR)
        if wait_until(lambda: "channel " in events.output(), 0.5):
            return events
    raise AssertionError(f"ctl events printed no channel\n{events.describe()}")


def restart_firewalld(shuttle: Shuttle, sig: signal.Signals) -> None:
    assert shuttle.firewalld is not None
    shuttle.firewalld.send(sig)
    assert shuttle.firewalld.wait(15) is not None, shuttle.outputs()
    shuttle.start_firewalld()


@pytest.mark.parametrize("method", METHODS)
def test_the_client_opens_its_session_again_after_firewalld_restarts(
    shuttle: Shuttle, method: str
) -> None:
    shuttle.write_policy(f"allow {shuttle.topo.user.name} hosts\n")
    restart_firewalld(shuttle, signal.SIGTERM)  # to read the policy
    subnets = (TARGET_NET, TARGET_NET6) if method == TPROXY else (TARGET_NET,)
    client = shuttle.start_client(method=method, subnets=subnets, extra=["-H"])
    assert wait_until(lambda: hosts_names(shuttle), 20, interval=0.2), shuttle.outputs()
    events = subscribe(shuttle)
    for round_no, sig in enumerate((signal.SIGTERM, signal.SIGKILL), 1):
        download = start_download(shuttle)
        restart_firewalld(shuttle, sig)
        assert wait_until(logged(client, BACK, round_no), 30), shuttle.outputs()
        assert client.alive(), shuttle.outputs()
        assert client.output().count(LOST) == round_no, client.output()
        assert_page(shuttle, T_ADDR)
        if method == TPROXY:  # the new session's UDP socket, and a reply socket from it
            assert_udp_echo(shuttle, T_ADDR, count=3)
        assert wait_until(lambda: hosts_names(shuttle), 20, interval=0.2), shuttle.outputs()
        download.stop(timeout=10)
    assert shuttle.stop_client(client) == 0, shuttle.outputs()
    text = events.output()
    assert text.count("  firewall session lost: shuttle-firewalld at ") == 2, text
    assert text.count(f"  firewall session open again (method {method}, port ") == 2, text


def test_a_refusal_after_the_restart_ends_the_client_with_its_reason(shuttle: Shuttle) -> None:
    client = shuttle.start_client(method="nft")
    assert shuttle.firewalld is not None
    assert shuttle.firewalld.stop(timeout=15) == 0, shuttle.outputs()
    # The new firewalld admits root's group only: waiting will not change that.
    argv = shuttle.firewalld_argv()
    argv[argv.index("--group") + 1] = "root"
    shuttle.firewalld = shuttle.topo.start("firewalld-root-only", argv)
    assert shuttle.firewalld.wait_for_line(FIREWALLD_READY, 20), shuttle.outputs()
    assert client.wait(30) == 1, shuttle.outputs()
    shuttle.clients.remove(client)
    assert LOST in client.output(), client.output()
    assert f"shuttle-client: no permission to use shuttle-firewalld at {shuttle.socket}: " in (
        client.output()
    )


# Run by the second user: a session into its own listener, then the largest update allowed,
# which keeps today's firewalld busy well past a lease; it prints how long that took.
BIG_UPDATE = """
import asyncio, socket, sys, time
from shuttle_client.firewall_session import FirewallSession

def net(i, suffix):
    return f"10.{i >> 8 & 255}.{i & 255}.{suffix}"

async def main():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = FirewallSession(sys.argv[1])
    await client.open("nft", listener.getsockname()[1], ["10.0.0.0/8"], [])
    started = time.monotonic()
    # Apart and with holes, so that nothing merges: each is a rule of its own.
    subnets = [net(i, "0/25") for i in range(50_000)]
    excludes = [net(i, "9/32") for i in range(50_000)]
    await client.update(subnets, excludes, timeout=300)
    print(f"updated in {time.monotonic() - started:.1f} s", flush=True)
    await client.close()

asyncio.run(main())
"""


def test_a_stalled_firewalld_is_slow_not_gone(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    client = shuttle.start_client(method="nft")
    tables = shuttle.leftovers()
    python = shuttle.venv.program("python")
    argv = [python, "-c", BIG_UPDATE, str(shuttle.socket)]
    update = topo.run_as_user(argv, user=topo.user2, timeout=300)
    assert update.returncode == 0, f"{update.stderr}\n{shuttle.outputs()}"
    assert client.alive(), shuttle.outputs()
    assert LOST not in client.output(), shuttle.outputs()
    assert shuttle.leftovers() == tables, "the same session's rules, not a new one's"
    assert_page(shuttle, T_ADDR)

"""netns.py with real namespaces: a caller's is found from its pid and entered by a thread
of its own; ids are mapped as the owning user namespace maps them; what cannot be entered or
mapped is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence

import pytest
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.netns import HOME, Namespaces, Netns
from shuttle_local.netns import OWN, enter, identity_of
from shuttle_protocol.firewall_messages import ANY_OWNER

from testbed.procs import Dialogue, wait_until

from .daemon import NOBODY as NOBODY_ARGV
from .daemon import Daemon, shuttle_tables

WAIT = 10.0
NOBODY = 65534


@pytest.fixture
def start() -> Iterator[Callable[[Sequence[str]], subprocess.Popen[bytes]]]:
    """Start a process that waits (argv, then sleep), once it is where argv puts it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    started: list[subprocess.Popen[bytes]] = []

    def run(argv: Sequence[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*argv, "sleep", "60"])
        started.append(proc)
        # Until it runs sleep: unshare and nsenter have made its namespaces by then.
        assert wait_until(lambda: os.readlink(f"/proc/{proc.pid}/exe").endswith("sleep"), WAIT)
        return proc

    yield run
    for proc in started:
        proc.kill()
        proc.wait(WAIT)


def thread_namespace() -> tuple[int, int]:
    return identity_of("/proc/thread-self/ns/net")


def test_firewalld_s_own_namespace_runs_where_it_is_called(
    start: Callable[[Sequence[str]], subprocess.Popen[bytes]],
) -> None:
    namespaces = Namespaces()
    assert namespaces.of(os.getpid(), 0, ANY_OWNER) is HOME
    assert namespaces.of(start([]).pid, 0, ANY_OWNER) is HOME
    assert namespaces.of(None, 0, ANY_OWNER) is HOME
    assert HOME.run(thread_namespace) == thread_namespace()
    assert (HOME.uid(1000), HOME.gid(ANY_OWNER)) == (1000, ANY_OWNER)
    assert len(namespaces) == 0


def test_another_namespace_is_entered_by_one_thread_while_sessions_live_there(
    start: Callable[[Sequence[str]], subprocess.Popen[bytes]],
) -> None:
    proc = start(["unshare", "--net"])
    theirs = identity_of(f"/proc/{proc.pid}/ns/net")
    namespaces = Namespaces()
    first = namespaces.of(proc.pid, 1000, ANY_OWNER)
    second = namespaces.of(proc.pid, 0, 27)
    assert first is second and len(namespaces) == 1
    assert first.run(thread_namespace) == theirs != thread_namespace()
    assert first.quick(thread_namespace) == theirs  # the loop's thread there
    assert first.run(identity_of, OWN) != theirs  # the thread alone: not the whole process
    assert (first.uid(1000), first.gid(27)) == (1000, 27)  # firewalld's user namespace
    with pytest.raises(ValueError, match=r"^raised there$"):
        first.run(_raise, "raised there")
    proc.kill()
    proc.wait(WAIT)
    # Its last process gone, the namespace is still there for the removal.
    assert first.run(thread_namespace) == theirs
    namespaces.release(first)
    assert first.run(thread_namespace) == theirs
    namespaces.release(second)
    assert len(namespaces) == 0


def _raise(text: str) -> None:
    raise ValueError(text)


def test_a_user_namespace_of_the_callers_maps_the_ids_of_its_rules(
    start: Callable[[Sequence[str]], subprocess.Popen[bytes]],
) -> None:
    # unshare -rn as a member would: that uid is root in there.
    member = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    proc = start([*member, "unshare", "--map-root-user", "--net"])
    namespaces = Namespaces()
    netns = namespaces.of(proc.pid, NOBODY, ANY_OWNER)
    assert (netns.uid(NOBODY), netns.gid(NOBODY), netns.uid(ANY_OWNER)) == (0, 0, ANY_OWNER)
    assert netns.run(thread_namespace) == identity_of(f"/proc/{proc.pid}/ns/net")
    with pytest.raises(RequestError, match=r"^id 1000 has none in the user namespace that owns"):
        namespaces.of(proc.pid, 1000, ANY_OWNER)
    namespaces.release(netns)
    assert len(namespaces) == 0


def test_a_namespace_of_a_user_namespace_the_caller_is_not_in_is_refused(
    start: Callable[[Sequence[str]], subprocess.Popen[bytes]],
) -> None:
    owner = start(["unshare", "--map-root-user", "--net"])
    guest = start(["nsenter", f"--net=/proc/{owner.pid}/ns/net"])
    namespaces = Namespaces()
    with pytest.raises(RequestError, match="belongs to a user namespace it is not in"):
        namespaces.of(guest.pid, 0, ANY_OWNER)
    assert len(namespaces) == 0


def test_a_gone_caller_is_refused(
    start: Callable[[Sequence[str]], subprocess.Popen[bytes]],
) -> None:
    proc = start(["unshare", "--net"])
    proc.kill()
    proc.wait(WAIT)
    namespaces = Namespaces()
    with pytest.raises(RequestError, match=rf"^the calling process \(pid {proc.pid}\) has exited$"):
        namespaces.of(proc.pid, 0, ANY_OWNER)
    assert len(namespaces) == 0


def test_what_is_no_namespace_cannot_be_entered() -> None:
    with tempfile.TemporaryFile() as file:
        with pytest.raises(OSError, match="Invalid argument"):
            enter(file.fileno())
        fd = os.dup(file.fileno())
        with pytest.raises(
            RequestError,
            match=r"^cannot enter the network namespace of the calling process: Invalid argument$",
        ):
            Netns((0, 1), fd)
        with pytest.raises(OSError):  # closed with the refusal
            os.fstat(fd)


# A member in a network namespace of its own (unshare -rn: it is root in there): it opens a
# session into its listener, says "opened", and on each line it reads does what it says:
# "nft" prints its namespace's ruleset (one JSON line), "connect" connects to a captured
# address and prints where it landed, "close" closes the session; it ends with its input.
MEMBER = """\
import asyncio, json, socket, subprocess, sys
from shuttle_client.firewall_session import FirewallSession

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "route", "add", "10.0.0.0/8", "dev", "lo"], check=True)
listener = socket.create_server(("127.0.0.1", 12300))
listener.settimeout(10)

async def main():
    client = FirewallSession(sys.argv[1])
    print("opened", await client.open("nft", 12300, ["10.0.0.0/8"], [], uid=65534), flush=True)
    for line in sys.stdin:
        if line.strip() == "nft":
            ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True)
            print(json.dumps(ruleset.stdout), flush=True)
        elif line.strip() == "connect":
            with socket.create_connection(("10.1.2.3", 80), timeout=10):
                conn, _ = listener.accept()
                print("landed on", conn.getsockname()[1], flush=True)
                conn.close()
        else:
            await client.close()
            print("closed", flush=True)

asyncio.run(main())
"""


@pytest.mark.integration
def test_a_member_in_a_namespace_of_its_own_gets_rules_there_for_its_uid(
    netns: str, start_firewalld: Callable[..., Daemon]
) -> None:
    daemon = start_firewalld(group="nogroup")
    inside = ["unshare", "--map-root-user", "--net", sys.executable, "-c", MEMBER]
    member = Dialogue([*NOBODY_ARGV, *inside, str(daemon.socket_path)], timeout=WAIT * 3)
    try:
        assert member.line() == "opened nft\n"
        assert shuttle_tables(netns) == [], "firewalld's own namespace got rules"
        member.tell("nft")
        ruleset = json.loads(member.line())
        # Its uid as its user namespace maps it: it is 0 in there, and 65534 no socket's.
        assert "meta skuid 0 " in ruleset and "skuid 65534" not in ruleset
        member.tell("connect")  # its own traffic, captured into its listener
        assert member.line() == "landed on 12300\n"
        member.tell("close")
        assert member.line() == "closed\n"
        member.tell("nft")
        assert "shuttle" not in json.loads(member.line())
    finally:
        member.close()
    daemon.wait_for_line("shuttle-firewalld: no session in network namespace net:[")
    assert shuttle_tables(netns) == []

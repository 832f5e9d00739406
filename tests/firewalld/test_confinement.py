"""What firewalld does to the machine, watched from outside with strace: whatever it is
asked, by valid sessions of every method or by hostile frames whose text fields carry shell
syntax and paths, it runs only the firewall tools and writes only its sockets and its hosts
file, never a program or a path a request names. And its command line has no option that
could run one."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from shuttle_firewalld.main import USAGE
from shuttle_protocol.firewall_messages import ErrorAnswer, ListSessionsRequest
from shuttle_protocol.frames import encode_frame

from .captures import close_session, open_session
from .daemon import WAIT, Daemon, Listener, ask

# Programs firewalld may run: the firewall tools its methods use (by name, on PATH).
TOOLS = {
    "nft",
    "iptables-restore",
    "ip6tables-restore",
    "iptables-save",
    "ip6tables-save",
    "ip",
}
# System calls that create, change or remove a file or name in the file system.
WRITES = (
    "openat",
    "open",
    "creat",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
    "rmdir",
    "chmod",
    "fchmodat",
    "chown",
    "fchownat",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "truncate",
    "mknodat",
    "bind",
)
TRACED = ",".join(("execve", *WRITES))
_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+|\?)")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_SUN_PATH = re.compile(r'sun_path="((?:[^"\\]|\\.)*)"')
_WRITE_FLAGS = re.compile(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC")
SHELLISH = ("$(touch /tmp/shuttle-pwned)", "`id`", "; rm -rf /", "../../etc/passwd", "/etc/shadow")


def traced_calls(log: Path) -> list[tuple[str, list[str], str]]:
    """(call, its string arguments, its flags text) for every call strace logged."""
    calls = []
    for line in log.read_text(errors="replace").splitlines():
        match = _CALL.match(line)
        if match:
            _pid, call, args, _result = match.groups()
            calls.append((call, _STRING.findall(args), args))
    return calls


def programs_run(calls: list[tuple[str, list[str], str]]) -> set[str]:
    return {Path(strings[0]).name for call, strings, _ in calls if call == "execve" and strings}


def paths_written(calls: list[tuple[str, list[str], str]]) -> set[str]:
    written = set()
    for call, strings, args in calls:
        if call == "execve" or not strings:
            continue
        if call in ("openat", "open") and not _WRITE_FLAGS.search(args):
            continue  # a read
        if call == "bind":  # only a unix socket's address is a file
            written.update(_SUN_PATH.findall(args))
            continue
        written.update(
            strings[:2] if call.startswith(("rename", "link", "symlink")) else strings[:1]
        )
    return written


def allowed_write(path: str, own: Path) -> bool:
    if path.startswith(f"{own}/") or path in ("/dev/null", "/run/xtables.lock"):
        return True
    # The interpreter caching compiled modules at import: not driven by any request.
    return "/__pycache__/" in path


def stop_traced(daemon: Daemon) -> int | None:
    """SIGTERM firewalld itself (a signal to strace would only detach it), and wait: strace
    exits with its tracee's status."""
    children = Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children").read_text()
    for pid in map(int, children.split()):
        os.kill(pid, signal.SIGTERM)
    try:
        return daemon.proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        return None


def hostile_frames() -> list[bytes]:
    """Requests whose every text field is shell syntax or a path; all must be refused."""
    frames = []
    for text in SHELLISH:
        frames += [
            msgpack.packb([1, 64, "nat", 12300, [[text, 1, 65535]], [], 0, -1, False, []]),
            msgpack.packb([2, 64, text, 12300, [["10.0.0.0/8", 1, 65535]], [], 0, -1, False, []]),
            msgpack.packb(
                [3, 64, "nft", 12300, [["10.0.0.0/8", 1, 65535]], [], 0, -1, False, [text]]
            ),
            msgpack.packb([4, 75, "a" * 32, [[text, "10.0.0.1"]]]),
            msgpack.packb([5, 75, text, [["host.example", "10.0.0.1"]]]),
            msgpack.packb([6, 72, "a" * 32, text, 53]),
            msgpack.packb([7, 68, text]),
        ]
    return frames


@pytest.mark.integration
def test_firewalld_runs_only_the_firewall_tools_and_writes_only_its_own_files(
    routed: str,
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
    socket_dir: Path,
    tmp_path: Path,
) -> None:
    strace = shutil.which("strace")
    assert strace is not None, "strace is needed (make dev puts it there)"
    log = tmp_path / "strace.log"
    daemon = start_firewalld(
        wrap=[strace, "-f", "-qq", "-s", "4096", "-e", f"trace={TRACED}", "-o", str(log)],
        lease=30,
    )
    listen(12300, addresses=("127.0.0.1", "::1"))
    subnets = [("198.18.0.0/15", 80, 90), "fd00:5e::/32"]
    for method in ("nft", "nat"):
        client, applied = open_session(daemon, method, 12300, subnets, ["198.18.0.99/32"])
        try:
            assert applied == method
            assert asyncio.run(client.update([*subnets, "198.19.0.0/16"], [])) > 0
            assert asyncio.run(client.set_hosts([("target.shuttle.test", "198.18.0.5")])) == 1
        finally:
            close_session(client)
    client, _ = open_session(daemon, "tproxy", 1, subnets, [])
    try:
        _, sockets = asyncio.run(client.tproxy_sockets())
        for sock in sockets.values():
            sock.close()
        listen(40000, addresses=("0.0.0.0",), protocol="udp")  # the flow's program
        asyncio.run(client.reply_socket("198.18.0.5", 85, ("198.18.0.1", 40000))).close()
    finally:
        close_session(client)
    for frame in hostile_frames():
        _, reply = ask(daemon.socket_path, frame)
        assert isinstance(reply, ErrorAnswer), frame[:60]
    _, reply = ask(daemon.socket_path, encode_frame(9, ListSessionsRequest()))
    assert not isinstance(reply, ErrorAnswer)
    assert stop_traced(daemon) == 0, daemon.log
    calls = traced_calls(log)
    assert len(calls) > 20, "strace saw almost nothing: is it tracing?"
    programs = programs_run(calls)
    assert "shuttle-firewalld" in programs
    assert programs - {"shuttle-firewalld"} <= TOOLS, programs
    assert {"nft", "ip"} <= programs  # the check can see the tools it allows
    written = paths_written(calls)
    assert f"{socket_dir}/hosts" in written  # and the writes it allows
    assert {path for path in written if not allowed_write(path, socket_dir)} == set()
    assert not Path("/tmp/shuttle-pwned").exists()


def test_the_command_line_has_no_option_that_runs_a_command() -> None:
    """Every option firewalld takes, by name: a new one must be judged (and added here),
    because sudo rules for a root daemon that runs a given command are a root shell."""
    options = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", USAGE.split("Options:")[1]))
    assert options == {
        "--socket",
        "--group",
        "--lease",
        "--policy",
        "--hosts-file",
        "-v",
        "--verbose",
        "--json",
        "-h",
        "--help",
        "--version",
        # Judged: --one-shot serves SUDO_UID on a socket of its own; --sudoers prints a line.
        "--one-shot",
        "--sudoers",
    }

"""The command: its options, its start-up refusals, and its clean start and exit for real."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from shuttle_client.firewall_session import FirewallError, FirewallSession
from shuttle_firewalld.main import CtlOptions, Options, UsageError, main, parse_args

from .captures import close_session, open_session
from .daemon import (
    FIREWALLD,
    NOBODY,
    WAIT,
    Daemon,
    Listener,
    nothing_of_shuttle,
    shuttle_rules,
    shuttle_tables,
)


def test_defaults() -> None:
    assert parse_args([]) == Options(
        socket="/run/shuttle/firewalld.sock",
        group="shuttle",
        lease=6.0,
        verbose=False,
        policy="/etc/shuttle/firewalld.policy",
    )


def test_options() -> None:
    argv = ["--socket=/tmp/x.sock", "--group", "wheel", "--lease=2.5", "--policy=/p", "-v"]
    assert parse_args(argv) == Options(
        socket="/tmp/x.sock", group="wheel", lease=2.5, verbose=True, policy="/p"
    )


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--lease=x"], "--lease must be a number of seconds in [1, 3600], got 'x'"),
        (["--lease=0.5"], "--lease must be"),
        (["--lease=3601"], "--lease must be"),
        (["--lease=nan"], "--lease must be"),
        (["--lease=inf"], "--lease must be"),
        (["--socket=relative.sock"], "--socket must be an absolute path"),
        # 103: PATH.fds, the fd socket beside it, must fit a unix socket address too.
        (["--socket=/" + "x" * 103], "--socket must be an absolute path of at most 103 bytes"),
        (["--bogus"], "unexpected arguments: --bogus"),
        (["run", "/bin/sh"], "unexpected arguments: run /bin/sh"),
        (["--socket"], "--socket requires argument"),
        (["--policy=firewalld.policy"], "--policy must be an absolute path"),
    ],
)
def test_bad_arguments(argv: list[str], complaint: str) -> None:
    with pytest.raises(UsageError) as refused:
        parse_args(argv)
    assert str(refused.value).startswith(complaint)
    assert "\n" not in str(refused.value)


def test_ctl_sessions() -> None:
    assert parse_args(["ctl", "sessions"]) == CtlOptions("/run/shuttle/firewalld.sock", False)
    assert parse_args(["ctl", "sessions", "--json", "--socket=/tmp/x.sock"]) == CtlOptions(
        "/tmp/x.sock", True
    )


def test_the_longest_socket_path() -> None:
    assert parse_args(["--socket=/" + "x" * 102]).socket == "/" + "x" * 102


def test_bad_arguments_are_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--lease=-1"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("shuttle-firewalld: --lease must be")
    assert err.count("\n") == 1


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, text in ((["--help"], "Usage:"), (["--version"], "0.1.0")):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code in (0, None)
        assert text in capsys.readouterr().out


def run_firewalld(*argv: str, user: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*user, FIREWALLD, *argv], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.integration
def test_refuses_to_run_as_another_user(socket_dir: Path) -> None:
    done = run_firewalld(f"--socket={socket_dir}/fw.sock", user=tuple(NOBODY))
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "shuttle-firewalld: must run as root: it changes firewall rules\n"
    assert list(socket_dir.iterdir()) == []


@pytest.mark.integration
def test_refuses_a_missing_group(socket_dir: Path) -> None:
    group = f"no-such-group-{secrets.token_hex(4)}"
    done = run_firewalld(f"--socket={socket_dir}/fw.sock", f"--group={group}")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"shuttle-firewalld: group '{group}' does not exist: ")
    assert f"groupadd {group}" in done.stderr
    assert "--group" in done.stderr
    assert list(socket_dir.iterdir()) == []


@pytest.mark.integration
def test_sigterm_removes_every_rule_and_the_socket(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    daemon = start_firewalld()
    listen(12300)

    async def open_three() -> list[FirewallSession]:
        clients = [FirewallSession(str(daemon.socket_path)) for _ in range(3)]
        for client, method in zip(clients, ("nat", "nat", "auto")):
            await client.open(method, 12300, ["10.0.0.0/8"], [])
        return clients

    clients = asyncio.run(open_three())
    try:
        assert len(shuttle_rules(netns)) == 10
        assert len(shuttle_tables(netns)) == 1
        assert daemon.stop() == 0
        assert nothing_of_shuttle(netns)
        assert not daemon.socket_path.exists()
        assert not Path(f"{daemon.socket_path}.fds").exists()
        assert daemon.log.count("closed at exit: 4 nat rules removed") == 2
        assert daemon.log.count("closed at exit: 4 nft rules removed") == 1
    finally:
        for client in clients:
            asyncio.run(client.close())


@pytest.mark.integration
def test_a_second_daemon_on_the_same_socket_is_refused(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    daemon = start_firewalld()
    listen(12300)
    client = FirewallSession(str(daemon.socket_path))

    async def open_one() -> None:
        await client.open("nat", 12300, ["10.0.0.0/8"], [])

    try:
        asyncio.run(open_one())
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                netns,
                FIREWALLD,
                f"--socket={daemon.socket_path}",
                "--group=root",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 1
        assert done.stderr == (
            f"shuttle-firewalld: another shuttle-firewalld is listening on {daemon.socket_path}\n"
        )
        # The running daemon's socket and rules are untouched.
        assert daemon.socket_path.exists()
        assert len(shuttle_rules(netns)) == 5
    finally:
        asyncio.run(client.close())


@pytest.mark.integration
def test_without_nft_auto_means_nat(
    netns: str,
    socket_dir: Path,
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
) -> None:
    # A PATH with the iptables tools and without nft, as on a host that lacks it.
    tools = socket_dir / "bin"
    tools.mkdir()
    for name in ("iptables", "iptables-save", "iptables-restore"):
        for tool in (name, name.replace("iptables", "ip6tables")):
            found = shutil.which(tool)
            assert found is not None
            (tools / tool).symlink_to(found)
    daemon = start_firewalld(env={**os.environ, "PATH": str(tools)})
    assert "nft: cannot check for stale rules: nft failed: " in daemon.log
    assert "the nft method does not work here: nft failed: " in daemon.log
    assert "method auto means nat" in daemon.log
    listen(12300)
    client, method = open_session(daemon, "auto", 12300, ["10.0.0.0/8"], [])
    try:
        assert method == "nat"
        assert len(shuttle_rules(netns)) == 5
        refused = FirewallSession(str(daemon.socket_path))
        with pytest.raises(FirewallError, match="the nft method does not work on this host"):
            asyncio.run(refused.open("nft", 12300, ["10.0.0.0/8"], []))
        asyncio.run(refused.close())
    finally:
        close_session(client)
    assert shuttle_rules(netns) == []


@pytest.mark.integration
def test_after_a_crash_the_socket_files_are_replaced(
    netns: str, start_firewalld: Callable[..., Daemon]
) -> None:
    crashed = start_firewalld()
    crashed.proc.kill()  # SIGKILL: no clean-up at all
    crashed.stop()
    fds = Path(f"{crashed.socket_path}.fds")
    assert crashed.socket_path.exists()
    assert fds.exists()
    again = start_firewalld()
    assert again.proc.poll() is None
    assert fds.is_socket()


@pytest.mark.integration
def test_the_service_manager_hears_ready_the_sessions_and_stopping(
    netns: str,
    socket_dir: Path,
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
) -> None:
    path = socket_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        manager.settimeout(WAIT)
        daemon = start_firewalld(env={**os.environ, "NOTIFY_SOCKET": str(path)})
        listening = f"STATUS=listening on ipc://{daemon.socket_path};"
        assert manager.recv(4096).decode() == f"READY=1\n{listening} 0 sessions open\n"
        listen(12300)
        client, _ = open_session(daemon, "nat", 12300, ["10.0.0.0/8"], [])
        try:
            assert manager.recv(4096).decode() == f"{listening} 1 session open\n"
        finally:
            close_session(client)
        assert manager.recv(4096).decode() == f"{listening} 0 sessions open\n"
        client, _ = open_session(daemon, "nat", 12300, ["10.0.0.0/8"], [])
        try:
            assert manager.recv(4096).decode() == f"{listening} 1 session open\n"
            assert daemon.stop() == 0
        finally:
            close_session(client)
        # Stopping is said before the sessions go, and nothing after it says "listening".
        assert manager.recv(4096).decode() == "STOPPING=1\nSTATUS=stopping: removing 1 session\n"
        manager.setblocking(False)
        with pytest.raises(BlockingIOError):
            manager.recv(4096)
    assert nothing_of_shuttle(netns)


@pytest.mark.integration
def test_a_service_manager_that_is_gone_stops_nothing(
    netns: str, socket_dir: Path, start_firewalld: Callable[..., Daemon]
) -> None:
    daemon = start_firewalld(env={**os.environ, "NOTIFY_SOCKET": str(socket_dir / "gone")})
    daemon.wait_for_line(
        f"shuttle-firewalld: cannot notify the service manager at {socket_dir}/gone: "
    )
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0

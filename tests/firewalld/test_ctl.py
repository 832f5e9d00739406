"""`shuttle-firewalld ctl sessions`: the table and the JSON, then for real against a daemon:
what root and another uid see, and the one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from shuttle_firewalld.ctl import as_json, duration, table
from shuttle_protocol.firewall_messages import ANY_OWNER, SessionEntry

from .captures import close_session, open_session
from .daemon import FIREWALLD, NOBODY, WAIT, Daemon, Listener

ENTRY = SessionEntry(
    "0123456789ab", 1000, "nft", 12300, 3, 1, 2, 9, 1000, ANY_OWNER, False, 725.4, 4.25, 2
)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59.9, "59s"),
        (60, "1m00s"),
        (725.4, "12m05s"),
        (3600, "1h00m"),
        (10_920, "3h02m"),
    ],
)
def test_durations(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_the_table_has_a_header_and_a_line_per_session() -> None:
    other = ENTRY._replace(
        session="ba9876543210", caller=0, method="tproxy", port=41000, uid=-1, gid=27, forward=True
    )
    assert table((ENTRY, other)).splitlines() == [
        "SESSION       OWNER  METHOD  PORT   SUBNETS  EXCLUDES  DNS  RULES  "
        "SCOPE                      OPENED      LEASE  HOSTS",
        "0123456789ab  1000   nft     12300  3        1         2    9      "
        "uid 1000                   12m05s ago  4.2s   2",
        "ba9876543210  0      tproxy  41000  3        1         2    9      "
        "every uid gid 27 +forward  12m05s ago  4.2s   2",
    ]


def test_no_sessions_is_said_in_words() -> None:
    assert table(()) == "no sessions\n"
    assert as_json(()) == "[]\n"


def test_json_names_every_field() -> None:
    assert json.loads(as_json((ENTRY,))) == [
        {
            "session": "0123456789ab",
            "caller": 1000,
            "method": "nft",
            "port": 12300,
            "subnets": 3,
            "excludes": 1,
            "nameservers": 2,
            "rules": 9,
            "uid": 1000,
            "gid": -1,
            "forward": False,
            "opened": 725.4,
            "lease": 4.25,
            "hosts": 2,
        }
    ]


# --- for real -------------------------------------------------------------------------------


def ctl(
    socket_path: Path, *args: str, user: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(user or []), FIREWALLD, "ctl", "sessions", f"--socket={socket_path}", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


HOLD = """\
import asyncio, sys
from shuttle_client.firewall_session import FirewallSession

async def main():
    client = FirewallSession(sys.argv[1])
    await client.open("nat", int(sys.argv[2]), ["10.0.0.0/8"], [])
    print(client.session, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await client.close()

asyncio.run(main())
"""


@pytest.fixture
def hold_as_nobody() -> Iterator[Callable[[Path, int], str]]:
    """Open a nat session as uid 65534 and keep it until the test ends; its id."""
    holders: list[subprocess.Popen[str]] = []

    def hold(socket_path: Path, port: int) -> str:
        holder = subprocess.Popen(
            [*NOBODY, sys.executable, "-c", HOLD, str(socket_path), str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        holders.append(holder)
        assert holder.stdout is not None
        session = holder.stdout.readline().strip()
        assert len(session) == 32, "the session of uid 65534 did not open"
        return session

    try:
        yield hold
    finally:
        for holder in holders:
            try:
                holder.communicate("done\n", timeout=WAIT)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.communicate(timeout=WAIT)


@pytest.mark.integration
def test_root_sees_every_session_and_another_uid_its_own(
    netns: str,
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
    hold_as_nobody: Callable[[Path, int], str],
) -> None:
    daemon = start_firewalld(group="nogroup", lease=60)
    assert ctl(daemon.socket_path).stdout == "no sessions\n"
    listen(12300)
    listen(12301, as_nobody=True)
    client, _ = open_session(daemon, "nft", 12300, ["10.0.0.0/8", "192.0.2.0/24"], [], dns=[])
    try:
        nobodys = hold_as_nobody(daemon.socket_path, 12301)
        assert client.session is not None
        done = ctl(daemon.socket_path, "--json")
        assert (done.returncode, done.stderr) == (0, "")
        listed = json.loads(done.stdout)
        assert [(entry["session"], entry["caller"], entry["method"]) for entry in listed] == [
            (client.session[:12], 0, "nft"),
            (nobodys[:12], 65534, "nat"),
        ]
        assert [(entry["subnets"], entry["rules"], entry["uid"]) for entry in listed] == [
            (2, 4, 0),
            (1, 4, 65534),
        ]
        assert all(0 < entry["lease"] <= 60 for entry in listed)
        # Another uid sees its own only: root's session stays invisible.
        mine = ctl(daemon.socket_path, "--json", user=NOBODY)
        assert (mine.returncode, mine.stderr) == (0, "")
        assert [entry["session"] for entry in json.loads(mine.stdout)] == [nobodys[:12]]
        lines = ctl(daemon.socket_path).stdout.splitlines()
        assert lines[0].split() == [
            "SESSION",
            "OWNER",
            "METHOD",
            "PORT",
            "SUBNETS",
            "EXCLUDES",
            "DNS",
            "RULES",
            "SCOPE",
            "OPENED",
            "LEASE",
            "HOSTS",
        ]
        assert [line.split()[:4] for line in lines[1:]] == [
            [client.session[:12], "0", "nft", "12300"],
            [nobodys[:12], "65534", "nat", "12301"],
        ]
    finally:
        close_session(client)


@pytest.mark.integration
def test_a_caller_outside_the_group_is_told_so(
    netns: str, start_firewalld: Callable[..., Daemon]
) -> None:
    daemon = start_firewalld(group="root")
    done = ctl(daemon.socket_path, user=NOBODY)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"shuttle-firewalld: permission denied on {daemon.socket_path}: only root and members "
        "of group root may connect\n"
    )


@pytest.mark.integration
def test_no_firewalld_is_one_line_and_status_1(socket_dir: Path) -> None:
    done = ctl(socket_dir / "firewalld.sock")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"shuttle-firewalld: cannot reach shuttle-firewalld at {socket_dir}/firewalld.sock: "
        "is it running? (no such socket)\n"
    )


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["ctl"], "ctl needs a command (known: sessions)"),
        (["ctl", "connections"], "unknown ctl command 'connections' (known: sessions)"),
        (["ctl", "sessions", "--group=root"], "unexpected arguments: ctl sessions --group=root"),
        (["ctl", "sessions", "--socket=x.sock"], "--socket must be an absolute path"),
        (["--json"], "unexpected arguments: --json"),
    ],
)
def test_usage_errors_are_one_line_and_status_2(argv: list[str], complaint: str) -> None:
    done = subprocess.run(
        [FIREWALLD, *argv], capture_output=True, text=True, timeout=30, check=False
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"shuttle-firewalld: {complaint}")
    assert done.stderr.count("\n") == 1

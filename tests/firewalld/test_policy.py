"""Scope policy: the decision table, the policy file's format and its refusals; then a real
caller of another uid, without and with a policy entry. (The hosts permission for real:
test_hosts_file.)"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from shuttle_firewalld.policy import (
    CAPTURE_OTHERS,
    FORWARD,
    HOSTS,
    Entry,
    Policy,
    PolicyError,
    load_policy,
    missing,
    parse,
    refusal,
)

from .daemon import FIREWALLD, Daemon, Listener, shuttle_tables
from .traffic import as_nobody, write

ANY = -1
BOTH = (CAPTURE_OTHERS, FORWARD)

# caller, uid asked, forward, granted -> missing: the table in policy.py, row by row.
DECISIONS = [
    (0, ANY, False, (), ()),
    (0, 1000, True, (), ()),
    (0, 0, True, (), ()),
    (1000, 1000, False, (), ()),
    (1000, ANY, False, (), (CAPTURE_OTHERS,)),
    (1000, 1001, False, (), (CAPTURE_OTHERS,)),
    (1000, 0, False, (), (CAPTURE_OTHERS,)),
    (1000, 1000, True, (), (FORWARD,)),
    (1000, ANY, True, (), (CAPTURE_OTHERS, FORWARD)),
    (1000, ANY, False, (CAPTURE_OTHERS,), ()),
    (1000, ANY, True, (CAPTURE_OTHERS,), (FORWARD,)),
    (1000, 1000, True, (FORWARD,), ()),
    (1000, ANY, True, (FORWARD,), (CAPTURE_OTHERS,)),
    (1000, ANY, True, BOTH, ()),
]


@pytest.mark.parametrize(("caller", "uid", "forward", "granted", "lacking"), DECISIONS)
def test_decision_table(
    caller: int, uid: int, forward: bool, granted: tuple[str, ...], lacking: tuple[str, ...]
) -> None:
    assert missing(caller, uid, forward, granted) == lacking


# caller, granted -> missing, for writing host names: whatever the session captures.
HOSTS_DECISIONS = [
    (0, (), ()),
    (1000, (), (HOSTS,)),
    (1000, BOTH, (HOSTS,)),
    (1000, (HOSTS,), ()),
]


@pytest.mark.parametrize(("caller", "granted", "lacking"), HOSTS_DECISIONS)
def test_hosts_decision_table(
    caller: int, granted: tuple[str, ...], lacking: tuple[str, ...]
) -> None:
    assert missing(caller, caller, False, granted, hosts=True) == lacking


def test_refusal_texts_say_what_is_needed_and_where() -> None:
    path = "/etc/shuttle/firewalld.policy"
    assert refusal((CAPTURE_OTHERS,), path) == (
        "capturing other users' traffic needs root or a policy entry in "
        "/etc/shuttle/firewalld.policy (allow USER|@GROUP capture-others)"
    )
    assert refusal((FORWARD,), path) == (
        "capturing forwarded traffic needs root or a policy entry in "
        "/etc/shuttle/firewalld.policy (allow USER|@GROUP forward)"
    )
    assert refusal((HOSTS,), path) == (
        "writing host names into the hosts file needs root or a policy entry in "
        "/etc/shuttle/firewalld.policy (allow USER|@GROUP hosts)"
    )
    assert refusal(BOTH, path).count("needs root") == 2


def test_granted_to_users_and_through_groups() -> None:
    groups = {1000: {1000, 27}, 1001: {1001}, 1002: {1002, 27}}
    policy = Policy(
        "p",
        (
            Entry(1000, None, frozenset({FORWARD})),
            Entry(None, 27, frozenset({CAPTURE_OTHERS})),
            Entry(1001, None, frozenset(BOTH)),
        ),
        groups_of=lambda uid: groups.get(uid, set()),
    )
    assert policy.granted(1000) == frozenset(BOTH)
    assert policy.granted(1001) == frozenset(BOTH)
    assert policy.granted(1002) == frozenset({CAPTURE_OTHERS})
    assert policy.granted(1003) == frozenset()
    assert policy.check(1002, ANY, False) is None
    assert policy.check(1002, ANY, True) == refusal((FORWARD,), "p")
    assert policy.check(1003, 1003, False) is None
    assert Policy("p").check(0, ANY, True) is None


def test_check_hosts_through_users_and_groups() -> None:
    groups = {1000: {1000, 27}, 1001: {1001}}
    policy = Policy(
        "p",
        (Entry(None, 27, frozenset({HOSTS})), Entry(1001, None, frozenset(BOTH))),
        groups_of=lambda uid: groups.get(uid, set()),
    )
    assert policy.check_hosts(1000) is None
    assert policy.check_hosts(1001) == refusal((HOSTS,), "p")  # the others do not give it
    assert policy.check_hosts(0) is None
    assert Policy("p").check_hosts(0) is None
    assert Policy("p").check_hosts(1000) == refusal((HOSTS,), "p")


def test_host_names_may_be_limited_to_domains() -> None:
    groups = {1000: {1000, 27}, 1001: {1001, 28}, 1002: {1002, 27, 29}}
    policy = Policy(
        "p",
        (
            Entry(None, 27, frozenset({HOSTS}), frozenset({b"corp.example"})),
            Entry(1000, None, frozenset({HOSTS}), frozenset({b"lab.example"})),
            Entry(None, 28, frozenset({FORWARD}), frozenset({b"never.example"})),
            Entry(None, 29, frozenset({HOSTS})),
        ),
        groups_of=lambda uid: groups.get(uid, set()),
    )
    assert policy.domains(1000) == {b"corp.example", b"lab.example"}  # entries add up
    assert policy.domains(1001) == frozenset()  # only an entry that grants hosts counts
    assert policy.domains(1002) is None  # a plain hosts entry allows any name
    assert policy.domains(0) is None


@pytest.mark.parametrize(
    ("line", "domains"),
    [
        ("allow nobody hosts=Corp.Example", {b"corp.example"}),
        (
            "allow nobody hosts=corp.example,lab hosts=x.example",
            {b"corp.example", b"lab", b"x.example"},
        ),
        ("allow nobody hosts=corp.example hosts", None),
        ("allow nobody hosts", None),
    ],
)
def test_parse_hosts_domains(line: str, domains: set[bytes] | None) -> None:
    (entry,) = parse(line, "/p").entries
    assert entry == Entry(65534, None, frozenset({HOSTS}), domains and frozenset(domains))


GOOD = """\
# who may ask for more than their own traffic
allow root capture-others   # a comment after a line

\tallow   @nogroup   forward  capture-others
allow nobody forward
allow @nogroup hosts
"""


def test_parse_a_good_file() -> None:
    policy = parse(GOOD, "/p")
    assert policy.path == "/p"
    assert policy.entries == (
        Entry(0, None, frozenset({CAPTURE_OTHERS})),
        Entry(None, 65534, frozenset(BOTH)),
        Entry(65534, None, frozenset({FORWARD})),
        Entry(None, 65534, frozenset({HOSTS})),
    )


def test_an_empty_file_allows_nothing() -> None:
    assert parse("# nothing yet\n\n", "/p").entries == ()


FORMAT = "(a line is: allow USER|@GROUP PERMISSION...)"
KNOWN = "(known: capture-others, forward, hosts, hosts=DOMAIN,...)"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (
            "deny nobody forward",
            f"unknown keyword 'deny' {FORMAT}",
        ),
        ("allow", f"incomplete line {FORMAT}"),
        ("allow nobody", f"incomplete line {FORMAT}"),
        (
            "allow nobody everything",
            f"unknown permission 'everything' {KNOWN}",
        ),
        ("allow nobody forward root", f"unknown permission 'root' {KNOWN}"),
        ("allow no-such-user-x forward", "no user 'no-such-user-x'"),
        ("allow @no-such-group-x forward", "no group 'no-such-group-x'"),
        ("allow @ forward", "no group ''"),
        ("allow nobody hosts=", "hosts= domain: '' is not a valid host name"),
        ("allow nobody hosts=a,,b", "hosts= domain: '' is not a valid host name"),
        (
            "allow nobody hosts=.corp.example",
            "hosts= domain: '.corp.example' is not a valid host name",
        ),
        ("allow nobody hosts=10.1.2.3", "hosts= domain: '10.1.2.3' is not a valid host name"),
        (
            "Allow nobody forward",
            f"unknown keyword 'Allow' {FORMAT}",
        ),
    ],
)
def test_each_kind_of_bad_line_is_named_with_file_and_line(line: str, problem: str) -> None:
    with pytest.raises(PolicyError) as failed:
        parse(f"# first\nallow root forward\n{line}\n", "/etc/x.policy")
    assert str(failed.value) == f"/etc/x.policy:3: {problem}"


def test_load_a_missing_file_allows_nothing(tmp_path: Path) -> None:
    assert load_policy(str(tmp_path / "missing")) == Policy(str(tmp_path / "missing"))


def test_load_a_good_file(tmp_path: Path) -> None:
    path = write(tmp_path / "p", GOOD.encode())
    if os.stat(path).st_uid != 0:
        pytest.skip("the file must be root's")
    assert load_policy(path) == parse(GOOD, path)


@pytest.mark.parametrize(
    ("data", "mode", "problem"),
    [
        (b"allow nobody forward\n", 0o664, "must be owned by root and writable by root only"),
        (b"allow nobody forward\n", 0o646, "must be owned by root and writable by root only"),
        (b"# ok\n\xff\n", 0o644, "2: not UTF-8 text"),
        (b"#" * (1024 * 1024 + 1), 0o644, "larger than 1048576 bytes"),
        (b"allow nobody\n", 0o644, "1: incomplete line"),
    ],
)
def test_load_refuses(tmp_path: Path, data: bytes, mode: int, problem: str) -> None:
    path = write(tmp_path / "p", data, mode)
    if os.stat(path).st_uid != 0:
        pytest.skip("the file must be root's")
    separator = "" if problem[0].isdigit() else " "
    with pytest.raises(PolicyError) as failed:
        load_policy(path)
    assert str(failed.value).startswith(f"{path}:{separator}{problem}")


def test_load_refuses_a_file_of_another_user(tmp_path: Path) -> None:
    path = write(tmp_path / "p", b"allow nobody forward\n")
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    os.chown(path, 65534, 65534)
    with pytest.raises(PolicyError, match="must be owned by root"):
        load_policy(path)


def test_load_refuses_what_is_not_a_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(PolicyError, match="not a regular file"):
        load_policy(str(fifo))
    with pytest.raises(PolicyError, match="not a regular file"):
        load_policy(str(tmp_path))


# --- real daemon ---------------------------------------------------------------------


@pytest.mark.integration
def test_capture_others_needs_a_policy_entry(
    netns: str,
    socket_dir: Path,
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
) -> None:
    listen(12301, as_nobody=True)
    daemon = start_firewalld(group="nogroup")
    socket = daemon.socket_path
    asked = {"method": "nft", "port": 12301, "subnets": ["10.0.0.0/8"], "excludes": []}
    assert as_nobody(socket, **asked, uid=-1) == (
        "shuttle-firewalld: capturing other users' traffic needs root or a policy entry in "
        f"{socket_dir}/firewalld.policy (allow USER|@GROUP capture-others)"
    )
    assert as_nobody(socket, **asked, uid=0).startswith(
        "shuttle-firewalld: capturing other users' traffic needs root"
    )
    assert as_nobody(socket, **asked) == "opened nft"  # its own traffic needs nothing
    assert as_nobody(socket, **asked, gid=0) == "opened nft"  # narrowing, whatever the gid
    assert shuttle_tables(netns) == []
    daemon.stop()

    write(socket_dir / "firewalld.policy", b"allow nobody capture-others\n")
    daemon = start_firewalld(group="nogroup")
    assert as_nobody(socket, **asked, uid=-1) == "opened nft"
    assert re.search(r"opened by uid 65534 \(pid \d+\): nft to port 12301", daemon.log)
    assert "capturing every uid" in daemon.log
    assert shuttle_tables(netns) == []


@pytest.mark.integration
def test_forward_needs_a_policy_entry_and_a_wildcard_listener(
    netns: str,
    socket_dir: Path,
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
) -> None:
    listen(12301, as_nobody=True)
    listen(12302, as_nobody=True, addresses=("0.0.0.0",))
    daemon = start_firewalld(group="nogroup")
    socket = daemon.socket_path
    asked = {"method": "nat", "subnets": ["10.0.0.0/8"], "excludes": [], "forward": True}
    assert as_nobody(socket, **asked, port=12302) == (
        "shuttle-firewalld: capturing forwarded traffic needs root or a policy entry in "
        f"{socket_dir}/firewalld.policy (allow USER|@GROUP forward)"
    )
    daemon.stop()

    write(socket_dir / "firewalld.policy", b"allow @nogroup forward\n")
    daemon = start_firewalld(group="nogroup")
    assert as_nobody(socket, **asked, port=12301) == (
        "shuttle-firewalld: no listening socket of uid 65534 on port 12301 at a wildcard "
        "address, where forwarded IPv4 connections land"
    )
    assert as_nobody(socket, **asked, port=12302) == "opened nat"
    assert "capturing uid 65534, and forwarded traffic" in daemon.log


@pytest.mark.integration
def test_a_bad_policy_file_stops_the_start(socket_dir: Path) -> None:
    policy = write(socket_dir / "bad.policy", b"# ok\nallow nobody fly\n")
    done = subprocess.run(
        [FIREWALLD, f"--socket={socket_dir}/fw.sock", "--group=root", f"--policy={policy}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"shuttle-firewalld: {policy}:2: unknown permission 'fly' "
        "(known: capture-others, forward, hosts, hosts=DOMAIN,...)\n"
    )
    assert not (socket_dir / "fw.sock").exists()

"""The hosts file's session blocks: set, replace, remove, stale removal, names nobody may
override, the atomic replace; then through the real daemon, whose caller may be hostile."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
from shuttle_firewalld import hosts_file
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.hosts_file import MAX_FILE, HostsFile, parse
from shuttle_firewalld.sessions import MAX_HOSTS_BYTES_PER_UID, MAX_HOSTS_PER_UID
from shuttle_protocol.firewall_messages import (
    MAX_HOSTS,
    ErrorAnswer,
    HeartbeatAnswer,
    HeartbeatRequest,
    SetHostsAnswer,
    SetHostsRequest,
)
from shuttle_protocol.frames import encode_frame

from .captures import close_session, open_session
from .daemon import NOBODY, WAIT, Daemon, Listener, ask, wait_until
from .traffic import write

A = "0123456789ab"  # short ids of two sessions
B = "ba9876543210"
NOTE = b"# managed by shuttle-firewalld: removed when the session ends; do not edit\n"
ADMIN = (
    b"127.0.0.1\tlocalhost\n"
    b"# the admin's own comment, with trailing blanks  \n"
    b"\n"
    b"10.9.9.9 Admin-Box  alias1 # a comment after the names\n"
    b"192.0.2.1 crlf-box\r\n"
    b"\xff\xfe not UTF-8, kept as it is\n"
)


def block(short_id: str, *lines: str) -> bytes:
    body = "".join(f"{line}\n" for line in lines).encode()
    return (
        f"# shuttle session {short_id} begin\n".encode()
        + NOTE
        + body
        + f"# shuttle session {short_id} end\n".encode()
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A hosts file holding the admin's lines."""
    hosts = tmp_path / "hosts"
    hosts.write_bytes(ADMIN)
    hosts.chmod(0o644)
    return hosts


def others_in(directory: Path) -> list[str]:
    """Files in directory but the hosts file: a temporary file must not be left behind."""
    return sorted(name for name in os.listdir(directory) if name != "hosts")


# --- set, replace, remove ---------------------------------------------------------------


def test_set_appends_the_sessions_block(path: Path) -> None:
    count = HostsFile(str(path)).set(A, [("db1", "10.1.2.3"), ("web.corp.example", "fd00:5e::7")])
    assert count == 2
    assert path.read_bytes() == ADMIN + block(A, "10.1.2.3 db1", "fd00:5e::7 web.corp.example")


def test_set_again_replaces_the_block_where_it_is(path: Path) -> None:
    hosts = HostsFile(str(path))
    hosts.set(A, [("db1", "10.1.2.3")])
    with path.open("ab") as file:
        file.write(b"10.8.8.8 added-later\n")
    assert hosts.set(A, [("db2", "10.1.2.4"), ("db3", "10.1.2.5")]) == 2
    assert path.read_bytes() == (
        ADMIN + block(A, "10.1.2.4 db2", "10.1.2.5 db3") + b"10.8.8.8 added-later\n"
    )


def test_an_empty_set_removes_the_block(path: Path) -> None:
    hosts = HostsFile(str(path))
    hosts.set(A, [("db1", "10.1.2.3")])
    assert hosts.set(A, []) == 0
    assert path.read_bytes() == ADMIN


def test_remove_leaves_the_file_as_it_was(path: Path) -> None:
    hosts = HostsFile(str(path))
    hosts.set(A, [("db1", "10.1.2.3")])
    hosts.set(B, [("db2", "10.1.2.4")])
    assert hosts.remove(A) is True
    assert path.read_bytes() == ADMIN + block(B, "10.1.2.4 db2")
    assert hosts.remove(B) is True
    assert path.read_bytes() == ADMIN
    inode = path.stat().st_ino
    assert hosts.remove(B) is False
    assert path.stat().st_ino == inode  # nothing to do: not even rewritten


def test_remove_stale_removes_every_block_and_nothing_else(path: Path) -> None:
    path.write_bytes(
        b"127.0.0.1 localhost\n"
        + block(A, "10.1.2.3 db1")
        + b"10.9.9.9 between\n"
        + block(B, "10.1.2.4 db2", "10.1.2.5 db3")
        + b"# the end\n"
    )
    assert HostsFile(str(path)).remove_stale() == 2
    assert path.read_bytes() == b"127.0.0.1 localhost\n10.9.9.9 between\n# the end\n"


def test_remove_stale_without_blocks_does_not_rewrite(path: Path) -> None:
    inode = path.stat().st_ino
    assert HostsFile(str(path)).remove_stale() == 0
    assert path.stat().st_ino == inode
    assert path.read_bytes() == ADMIN


def test_repeated_entries_are_written_once(path: Path) -> None:
    entries = [("db1", "10.1.2.3"), ("db1", "10.1.2.3"), ("DB1", "10.1.2.3"), ("db1", "fd00::1")]
    assert HostsFile(str(path)).set(A, entries) == 2
    assert path.read_bytes() == ADMIN + block(A, "10.1.2.3 db1", "fd00::1 db1")


# --- names nobody may override ------------------------------------------------------------


def test_names_the_admin_gave_are_skipped(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    entries = [
        ("localhost", "10.6.6.6"),  # the admin's, with a tab before it
        ("admin-box", "10.6.6.6"),  # the admin's Admin-Box: lookups ignore case
        ("ALIAS1", "10.6.6.6"),  # an alias on the admin's line
        ("crlf-box", "10.6.6.6"),  # its line ends in "\r\n": the "\r" is a blank
        ("comment", "10.6.6.6"),  # only in a comment: free
        ("mine", "10.1.2.3"),
    ]
    with caplog.at_level(logging.INFO):
        assert HostsFile(str(path)).set(A, entries) == 2
    assert path.read_bytes() == ADMIN + block(A, "10.6.6.6 comment", "10.1.2.3 mine")
    assert (
        f"session {A}: 4 host names skipped, taken in {path}, reserved or not allowed: "
        "localhost, admin-box, ALIAS1, crlf-box"
    ) in caplog.text


def test_another_sessions_names_are_skipped(path: Path) -> None:
    hosts = HostsFile(str(path))
    hosts.set(A, [("db1", "10.1.2.3")])
    assert hosts.set(B, [("db1", "10.6.6.6"), ("db2", "10.1.2.4")]) == 1
    assert path.read_bytes() == ADMIN + block(A, "10.1.2.3 db1") + block(B, "10.1.2.4 db2")
    # A session's own earlier names are not in its way; once A is gone, db1 is free.
    assert hosts.set(A, [("db1", "10.1.2.9")]) == 1
    hosts.remove(A)
    assert hosts.set(B, [("db1", "10.6.6.6"), ("db2", "10.1.2.4")]) == 2
    assert path.read_bytes() == ADMIN + block(B, "10.6.6.6 db1", "10.1.2.4 db2")


def test_reserved_names_are_skipped_even_where_the_file_lacks_them(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    own = socket.gethostname()
    fqdn = socket.getfqdn()
    entries = [
        ("localhost", "10.6.6.6"),
        ("LocalHost", "10.6.6.6"),
        ("db.localhost", "10.6.6.6"),
        ("localhost.localdomain", "10.6.6.6"),
        ("localhost6", "10.6.6.6"),
        ("ip6-localhost", "10.6.6.6"),
        ("ip6-loopback", "10.6.6.6"),
        ("wpad", "10.6.6.6"),
        ("WPAD.corp.example", "10.6.6.6"),
        (own.upper(), "10.6.6.6"),
        (own.split(".")[0], "10.6.6.6"),
        (fqdn, "10.6.6.6"),
        ("localhost.example", "10.1.2.3"),  # only under .localhost
        ("corp.wpad.example", "10.1.2.4"),  # wpad only as the first label
    ]
    assert HostsFile(str(path)).set(A, entries) == 2
    assert path.read_bytes() == block(A, "10.1.2.3 localhost.example", "10.1.2.4 corp.wpad.example")


def test_names_outside_the_allowed_domains_are_skipped(path: Path) -> None:
    hosts = HostsFile(str(path))
    entries = [
        ("db1.corp.example", "10.1.2.3"),
        ("Corp.Example", "10.1.2.4"),
        ("deb.debian.org", "10.6.6.6"),
        ("evilcorp.example", "10.6.6.6"),  # not under corp.example: a label must end there
        ("corp.example.evil", "10.6.6.6"),
        ("db2.lab", "10.1.2.5"),
    ]
    assert hosts.set(A, entries, {b"corp.example", b"lab"}) == 3
    assert path.read_bytes() == ADMIN + block(
        A, "10.1.2.3 db1.corp.example", "10.1.2.4 Corp.Example", "10.1.2.5 db2.lab"
    )
    assert hosts.set(A, entries, set()) == 0  # no domain: no name
    assert path.read_bytes() == ADMIN


def test_when_every_name_is_skipped_there_is_no_block(path: Path) -> None:
    hosts = HostsFile(str(path))
    hosts.set(A, [("db1", "10.1.2.3")])
    assert hosts.set(A, [("localhost", "10.6.6.6")]) == 0
    assert path.read_bytes() == ADMIN


# --- lines outside the blocks, and marker lines that form no block ---------------------------


def test_lines_around_blocks_are_kept_byte_for_byte(path: Path) -> None:
    hosts = HostsFile(str(path))
    hosts.set(A, [("db1", "10.1.2.3")])
    after = b"\t  \n# after\r\n10.7.7.7 after-box"  # and no final newline
    with path.open("ab") as file:
        file.write(after)
    hosts.set(B, [("db2", "10.1.2.4")])
    hosts.set(A, [("db3", "10.1.2.5")])
    # The one change outside the blocks: the last line gets a newline before a block.
    expected = ADMIN + block(A, "10.1.2.5 db3") + after + b"\n" + block(B, "10.1.2.4 db2")
    assert path.read_bytes() == expected
    hosts.remove(A)
    hosts.remove(B)
    assert path.read_bytes() == ADMIN + after + b"\n"


def test_a_file_without_a_final_newline_is_kept_as_it_is_when_nothing_is_added(
    path: Path,
) -> None:
    path.write_bytes(b"10.7.7.7 box" + b"\n" + block(A, "10.1.2.3 db1")[:-1])  # end, no "\n"
    HostsFile(str(path)).remove(A)
    assert path.read_bytes() == b"10.7.7.7 box\n"


def test_a_begin_without_its_end_is_not_a_block(path: Path) -> None:
    # Only a hand edit makes one (firewalld replaces the file whole): nothing is deleted, and
    # its names still count as somebody else's.
    cut = block(A, "10.1.2.3 db1").split(b"# shuttle session 0123456789ab end")[0]
    original = ADMIN + cut + b"10.9.9.8 admin-after\n"
    path.write_bytes(original)
    hosts = HostsFile(str(path))
    assert hosts.remove_stale() == 0
    assert hosts.remove(A) is False
    assert path.read_bytes() == original
    assert hosts.set(A, [("db1", "10.6.6.6"), ("db2", "10.1.2.4")]) == 1
    assert path.read_bytes() == original + block(A, "10.1.2.4 db2")
    assert hosts.remove(A) is True
    assert path.read_bytes() == original


@pytest.mark.parametrize(
    "stray",
    [
        b"# shuttle session 0123456789ab end\n",  # an end alone
        b"# shuttle session ba9876543210 begin\n# shuttle session 0123456789ab end\n",
        b"# shuttle session 0123456789ab begin \n10.1.1.1 x\n# shuttle session 0123456789ab end\n",
        b"# shuttle session 0123456789AB begin\n# shuttle session 0123456789AB end\n",
        b"# Shuttle session 0123456789ab begin\n# Shuttle session 0123456789ab end\n",
    ],
)
def test_marker_lines_that_form_no_block_are_kept(path: Path, stray: bytes) -> None:
    original = ADMIN + stray
    path.write_bytes(original)
    hosts = HostsFile(str(path))
    assert hosts.remove_stale() == 0
    assert hosts.remove(A) is False
    assert path.read_bytes() == original


def test_parse_splits_at_newlines_only() -> None:
    data = b"a\rb\n" + block(A, "10.1.2.3 db1") + b"c"
    parts = parse(data)
    assert parts[0] == b"a\rb\n"
    assert parts[-1] == b"c"
    assert len(parts) == 3


# --- checked again, and bounded ------------------------------------------------------------

# Hostile host entries, and what the refusal says: the daemon answers them through the
# protocol's checks, and HostsFile checks them again by the same rules.
HOSTILE: list[tuple[Any, str]] = [
    ([("db\n1", "10.1.2.3")], "hosts name: 'db\\n1' is not a valid host name"),
    ([("db1\n10.6.6.6 localhost", "10.1.2.3")], "is not a valid host name"),
    ([("db#1", "10.1.2.3")], "is not a valid host name"),
    ([("db 1", "10.1.2.3")], "is not a valid host name"),
    ([("d\u00e9j\u00e0", "10.1.2.3")], "is not a valid host name"),
    ([("xn--\u0430pple", "10.1.2.3")], "is not a valid host name"),
    ([("10.1.2.3", "10.1.2.3")], "is not a valid host name"),
    ([("::1", "10.1.2.3")], "is not a valid host name"),
    ([("a" * 300, "10.1.2.3")], "hosts name must be text of at most 253 characters"),
    ([("db1.", "10.1.2.3")], "is not a valid host name"),
    ([("-db1", "10.1.2.3")], "is not a valid host name"),
    ([("", "10.1.2.3")], "is not a valid host name"),
    ([("db1\x00", "10.1.2.3")], "is not a valid host name"),
    ([("db1", "010.1.2.3")], "hosts address"),
    ([("db1", "10.1.2.3 ")], "hosts address"),
    ([("db1", "FD00::1")], "is not written canonically (fd00::1)"),
    ([("db1", "fd00:0::1")], "is not written canonically (fd00::1)"),
    ([("db1", "fe80::1%eth0")], "has a scope id"),
    ([("db1", "10.1.2.3\n10.6.6.6 localhost")], "hosts address"),
    ([("db1", 167838211)], "hosts address must be text"),
    ([(b"db1", "10.1.2.3")], "hosts name must be text"),
    ([("db1",)], "each of hosts is [host name, address]"),
    ([("db1", "10.1.2.3", "x")], "each of hosts is [host name, address]"),
    (["db1 10.1.2.3"], "each of hosts is [host name, address]"),
    ("db1 10.1.2.3", "hosts must be a list of at most 10000 items"),
    (None, "hosts must be a list of at most 10000 items"),
    ([("db1", "10.1.2.3")] * (MAX_HOSTS + 1), "hosts must be a list of at most 10000 items"),
]

# HostsFile.set takes a list (the daemon's request checks what is not one), and its entries
# must be tuples (msgpack gives nothing else).
HOSTILE_ENTRIES = [case for case in HOSTILE if isinstance(case[0], list)]
HOSTILE_ENTRIES.append(([["db1", "10.1.2.3"]], "each of hosts is [host name, address]"))


@pytest.mark.parametrize(("entries", "why"), HOSTILE_ENTRIES)
def test_entries_are_checked_again(path: Path, entries: Any, why: str) -> None:
    hosts = HostsFile(str(path))
    hosts.set(A, [("db0", "10.1.2.2")])
    before = path.read_bytes()
    with pytest.raises(RequestError, match=re.escape(why)):  # as the protocol's checks say it
        hosts.set(A, entries)
    assert path.read_bytes() == before


def test_the_most_entries(path: Path) -> None:
    entries = [(f"h{index}", "10.1.2.3") for index in range(MAX_HOSTS)]
    assert HostsFile(str(path)).set(A, entries) == MAX_HOSTS


def test_an_absurdly_big_file_is_not_read(path: Path) -> None:
    os.truncate(path, MAX_FILE + 1)  # sparse: no need to write it
    with pytest.raises(RequestError, match=r"is larger than 33554432 bytes; not read$"):
        HostsFile(str(path)).set(A, [("db1", "10.1.2.3")])
    assert path.stat().st_size == MAX_FILE + 1


def test_a_file_is_not_grown_over_the_limit(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hosts_file, "MAX_FILE", len(ADMIN) + 100)
    with pytest.raises(RequestError, match=r"would grow over \d+ bytes; it is unchanged$"):
        HostsFile(str(path)).set(A, [(f"h{index}", "10.1.2.3") for index in range(10)])
    assert path.read_bytes() == ADMIN


def test_a_symbolic_link_is_refused(path: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(RequestError, match=r"is a symbolic link; firewalld replaces"):
        HostsFile(str(link)).set(A, [("db1", "10.1.2.3")])
    assert link.is_symlink()
    assert path.read_bytes() == ADMIN


def test_what_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (fifo, tmp_path):
        with pytest.raises(RequestError, match=r"is not a regular file$"):
            HostsFile(str(target)).set(A, [("db1", "10.1.2.3")])


# --- the atomic replace -------------------------------------------------------------------


def test_a_missing_file_is_created_readable_by_all(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    hosts = HostsFile(str(path))
    assert hosts.remove(A) is False
    assert hosts.remove_stale() == 0
    assert hosts.set(A, []) == 0
    assert not path.exists()  # nothing to write, no file
    hosts.set(A, [("db1", "10.1.2.3")])
    assert path.read_bytes() == block(A, "10.1.2.3 db1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    hosts.remove(A)
    assert path.read_bytes() == b""


def test_the_file_is_replaced_with_its_mode_and_owner(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    os.chown(path, 65534, 65534)
    path.chmod(0o640)
    inode = path.stat().st_ino
    HostsFile(str(path)).set(A, [("db1", "10.1.2.3")])
    info = path.stat()
    assert info.st_ino != inode  # a new file renamed over the old one, not a write in place
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (65534, 65534, 0o640)
    assert others_in(path.parent) == []


@pytest.mark.parametrize("failing", ["fsync", "replace", "fchown"])
def test_a_failing_write_leaves_the_old_file(
    path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    hosts = HostsFile(str(path))
    hosts.set(A, [("db1", "10.1.2.3")])
    before, inode = path.read_bytes(), path.stat().st_ino

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, fail)
    changes: list[Callable[[], object]] = [
        lambda: hosts.set(A, [("db2", "10.1.2.4")]),
        lambda: hosts.remove(A),
    ]
    for change in changes:
        with pytest.raises(RequestError) as failed:
            change()
        assert str(failed.value) == f"cannot write {path}: No space left on device; it is unchanged"
        assert (path.read_bytes(), path.stat().st_ino) == (before, inode)
        assert others_in(path.parent) == []


def test_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "hosts"
    with pytest.raises(RequestError, match=r"^cannot write .*/no-such-dir/hosts: No such file"):
        HostsFile(str(path)).set(A, [("db1", "10.1.2.3")])


RESOLVE = """\
import json, socket, subprocess, sys
# In a mount namespace of its own: the system's /etc/hosts stays as it is.
subprocess.run(["mount", "--bind", sys.argv[1], "/etc/hosts"], check=True)
found = {}
for name in sys.argv[2:]:
    try:
        found[name] = sorted({info[4][0] for info in socket.getaddrinfo(name, None)})
    except socket.gaierror:
        found[name] = []
print(json.dumps(found))
"""


# What glibc's getaddrinfo finds for each name in the file written below.
RESOLVED = {
    "db1": ["10.1.2.3", "fd00:5e::3"],
    "WEB.corp.example": ["10.1.2.4"],  # case does not matter to lookups
    "other": ["10.1.2.9"],  # another session's block
    "admin-box": ["10.9.9.9"],  # the admin's line
}


@pytest.mark.integration
def test_the_resolver_reads_what_is_written(path: Path) -> None:
    hosts = HostsFile(str(path))
    hosts.set(B, [("other", "10.1.2.9")])
    hosts.set(A, [("db1", "10.1.2.3"), ("db1", "fd00:5e::3"), ("web.corp.example", "10.1.2.4")])
    done = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", RESOLVE, str(path), *RESOLVED],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr  # the tests run as root: unshare -m works
    assert json.loads(done.stdout) == RESOLVED


OWN_NAMES = """\
import socket, subprocess, sys
from shuttle_firewalld.hosts_file import HostsFile
# In mount and UTS namespaces of its own: the system's /etc/hosts and name stay as they are.
subprocess.run(["mount", "--bind", sys.argv[1], "/etc/hosts"], check=True)
socket.sethostname("box")
entries = [(name, "10.1.2.3") for name in sys.argv[3:]]
print(HostsFile(sys.argv[2]).set("0123456789ab", entries))
"""


@pytest.mark.integration
def test_this_hosts_names_from_its_resolver_are_skipped(tmp_path: Path) -> None:
    system = tmp_path / "system-hosts"
    system.write_text("127.0.0.1 localhost\n127.0.1.1 box.corp.example box box-alias\n")
    path = tmp_path / "hosts"  # firewalld's file, another one than the resolver's
    names = ["box.corp.example", "BOX-ALIAS", "box", "other.corp.example"]
    done = subprocess.run(
        ["unshare", "-m", "-u", sys.executable, "-c", OWN_NAMES, str(system), str(path), *names],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1\n"
    assert path.read_bytes() == block(A, "10.1.2.3 other.corp.example")


# --- the real daemon ------------------------------------------------------------------------


def raw_set_hosts(session: Any, hosts: Any, request_id: int = 5) -> bytes:
    """A SetHostsRequest frame as msgpack, whatever the fields: no constructor checks it."""
    data: bytes = msgpack.packb([request_id, SetHostsRequest.TAG, session, hosts])
    return data


@contextmanager
def root_session(
    daemon: Daemon, listen: Callable[..., Listener], hosts: list[tuple[str, str]] | None = None
) -> Iterator[Any]:
    """A nat session of root's, listening on 12300, whose block was set to hosts (if given);
    its client, which closes the session afterwards."""
    listen(12300)
    client, _ = open_session(daemon, "nat", 12300, ["10.0.0.0/8"], [])
    assert client.session is not None
    try:
        if hosts is not None:
            answer = ask(daemon.socket_path, raw_set_hosts(client.session, hosts))[1]
            assert answer == SetHostsAnswer(len(hosts))
        yield client
    finally:
        close_session(client)


@pytest.fixture
def admin_hosts(socket_dir: Path) -> Iterator[bytes]:
    """The daemon's hosts file (socket_dir/hosts) with the admin's lines; its bytes."""
    (socket_dir / "hosts").write_bytes(ADMIN)
    (socket_dir / "hosts").chmod(0o644)
    yield ADMIN


@pytest.mark.integration
def test_set_hosts_writes_the_block_and_close_removes_it(
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
    admin_hosts: bytes,
) -> None:
    daemon = start_firewalld(lease=30)
    with root_session(daemon, listen) as client:
        request = SetHostsRequest(client.session, (("db1", "10.1.2.3"), ("localhost", "10.6.6.6")))
        assert ask(daemon.socket_path, encode_frame(3, request)) == (3, SetHostsAnswer(1))
        assert daemon.hosts_file.read_bytes() == admin_hosts + block(
            client.session[:12], "10.1.2.3 db1"
        )
        assert "1 host names skipped" in daemon.log
    assert daemon.hosts_file.read_bytes() == admin_hosts


@pytest.mark.integration
def test_hostile_requests_are_refused_and_the_file_stays(
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
    admin_hosts: bytes,
) -> None:
    daemon = start_firewalld(lease=30)
    with root_session(daemon, listen) as client:
        session = client.session
        assert ask(daemon.socket_path, raw_set_hosts(session, [("db0", "10.1.2.2")])) == (
            5,
            SetHostsAnswer(1),
        )
        before = daemon.hosts_file.read_bytes()
        hostile = [(raw_set_hosts(session, hosts), why) for hosts, why in HOSTILE]
        hostile += [
            (raw_set_hosts(7, []), "session must be text"),
            (raw_set_hosts(session.upper(), []), "no such session"),
            (raw_set_hosts(session, {"db1": "10.1.2.3"}), "bad request: malformed frame"),
            (msgpack.packb([5, SetHostsRequest.TAG, session]), "takes 2 fields, got 1"),
        ]
        for payload, why in hostile:
            request_id, reply = ask(daemon.socket_path, payload)
            assert isinstance(reply, ErrorAnswer), why
            assert why in reply.text
            assert request_id in (5, 0)
            assert daemon.hosts_file.read_bytes() == before, why
            # The daemon is up and serves the next request.
            assert ask(daemon.socket_path, encode_frame(9, HeartbeatRequest(session))) == (
                9,
                HeartbeatAnswer(),
            )
        assert daemon.proc.poll() is None
    assert daemon.hosts_file.read_bytes() == admin_hosts


NOBODY_HOSTS = """\
import json, sys, zmq
from shuttle_protocol.firewall_messages import (
    CloseSessionRequest, ErrorAnswer, OpenSessionRequest, SetHostsRequest,
)
from shuttle_protocol.frames import decode_frame, encode_frame

path, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
steps = json.load(sys.stdin)  # not an argument: it may be bigger than one may be
context = zmq.Context()
dealer = context.socket(zmq.DEALER)
dealer.linger = 0
dealer.connect("ipc://" + path)

def ask(request):
    dealer.send(encode_frame(1, request))
    if not dealer.poll(10_000):
        raise SystemExit("no answer")
    return decode_frame(dealer.recv())[1]

opened = [
    ask(OpenSessionRequest("nat", port, (("10.0.0.0/8", 1, 65535),), (), 65534, -1, False, ()))
    .session
    for _ in range(count)
]
results = [opened[0]]
for session, hosts in steps:
    mine = opened[session] if isinstance(session, int) else session or opened[0]
    answer = ask(SetHostsRequest(mine, tuple(map(tuple, hosts))))
    results.append(answer.text if isinstance(answer, ErrorAnswer) else answer.count)
for session in opened:
    ask(CloseSessionRequest(session))
print(json.dumps(results))
dealer.close()
context.term()
"""


NOBODY_PORT = 12301  # where nobody's sessions redirect to: its listener (nobody_daemon)


@pytest.fixture
def nobody_daemon(
    socket_dir: Path, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> Callable[[bytes | None], Daemon]:
    """Starts a daemon that nobody (in nogroup) may reach, with this policy file (None: the
    file as it is); nobody listens on NOBODY_PORT for the sessions of nobody_sets_hosts."""
    listen(NOBODY_PORT, as_nobody=True)

    def start(policy: bytes | None) -> Daemon:
        if policy is not None:
            write(socket_dir / "firewalld.policy", policy)
        return start_firewalld(group="nogroup", lease=30)

    return start


def nobody_sets_hosts(
    daemon: Daemon, steps: list[tuple[str | int | None, list[Any]]], sessions: int = 1
) -> list[Any]:
    """As uid 65534: open nat sessions on NOBODY_PORT, ask SetHosts for each (session, hosts)
    (None: its first session; a number: its session of that index), close them; [its first
    session's id, then each count or error text]."""
    script = [sys.executable, "-c", NOBODY_HOSTS, str(daemon.socket_path), str(NOBODY_PORT)]
    done = subprocess.run(
        [*NOBODY, *script, str(sessions)],
        input=json.dumps(steps),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: list[Any] = json.loads(done.stdout)
    return result


@pytest.mark.integration
def test_setting_hosts_needs_the_hosts_permission(
    socket_dir: Path, nobody_daemon: Callable[[bytes | None], Daemon], admin_hosts: bytes
) -> None:
    daemon = nobody_daemon(None)
    result = nobody_sets_hosts(daemon, [(None, [("db1", "10.1.2.3")])])
    assert result[1:] == [
        "writing host names into the hosts file needs root or a policy entry in "
        f"{socket_dir}/firewalld.policy (allow USER|@GROUP hosts)"
    ]
    assert daemon.hosts_file.read_bytes() == admin_hosts
    daemon.stop()

    daemon = nobody_daemon(b"allow nobody hosts\n")
    result = nobody_sets_hosts(daemon, [(None, [("db1", "10.1.2.3")]), (None, [])])
    assert result[1:] == [1, 0]
    assert f"session {result[0][:12]}: 1 host entries in {daemon.hosts_file}" in daemon.log
    assert daemon.hosts_file.read_bytes() == admin_hosts  # emptied, then closed


@pytest.mark.integration
def test_a_grantee_may_be_held_to_domains_and_to_a_size(
    nobody_daemon: Callable[[bytes | None], Daemon], admin_hosts: bytes
) -> None:
    daemon = nobody_daemon(b"allow nobody hosts=corp.example\n")
    wanted = [("db1.corp.example", "10.1.2.3"), ("corp.example", "10.1.2.4")]
    outside = [("deb.debian.org", "10.6.6.6"), ("wpad.corp.example", "10.6.6.6")]
    # Two sessions, each asking for just under the per-uid entries: the second is refused.
    half = [(f"h{i}.corp.example", "10.1.2.5") for i in range(MAX_HOSTS_PER_UID // 2 + 1)]
    # Then fewer entries, but longer names than the per-uid bytes allow.
    long_name = ".".join(["a" * 60] * 3) + ".corp.example"
    many = MAX_HOSTS_BYTES_PER_UID // len(long_name) + 1
    big = [(long_name, f"10.2.{i // 250}.{i % 250 + 1}") for i in range(many)]
    result = nobody_sets_hosts(
        daemon,
        [(0, wanted + outside), (0, half), (1, half), (1, []), (0, big)],
        sessions=2,
    )
    assert result[1] == 2
    assert result[2] == len(half)
    assert "uid 65534's sessions would have 10002 host names" in result[3]
    assert result[4] == 0
    assert f"more than {MAX_HOSTS_PER_UID} names or {MAX_HOSTS_BYTES_PER_UID} bytes" in result[5]
    log = daemon.log
    assert "2 host names skipped, taken in" in log and "deb.debian.org" in log
    assert daemon.hosts_file.read_bytes() == admin_hosts  # all closed


@pytest.mark.integration
def test_another_uids_session_cannot_be_targeted(
    nobody_daemon: Callable[[bytes | None], Daemon],
    listen: Callable[..., Listener],
    admin_hosts: bytes,
) -> None:
    daemon = nobody_daemon(b"allow nobody hosts\n")
    with root_session(daemon, listen, [("db1", "10.1.2.3")]) as client:
        roots = client.session
        before = daemon.hosts_file.read_bytes()
        result = nobody_sets_hosts(daemon, [(roots, []), (roots, [("db2", "10.6.6.6")])])
        assert result[1:] == ["no such session", "no such session"]
        assert daemon.hosts_file.read_bytes() == before
        # Nor can root reach nobody's session (closed by now, but the answer is the same).
        assert ask(daemon.socket_path, raw_set_hosts(result[0], []))[1] == (
            ErrorAnswer("no such session")
        )
    assert daemon.hosts_file.read_bytes() == admin_hosts


@pytest.mark.integration
def test_lease_expiry_removes_the_block(
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
    admin_hosts: bytes,
) -> None:
    daemon = start_firewalld(lease=1)
    with root_session(daemon, listen, [("db1", "10.1.2.3")]) as client:
        session = client.session
        # No heartbeats: the lease runs out, and the block goes with the session.
        assert wait_until(lambda: daemon.hosts_file.read_bytes() == admin_hosts, WAIT)
        # Logged after the block went (close() logs last): waited for, not read at once.
        daemon.wait_for_line(f"shuttle-firewalld: session {session[:12]} of uid 0 expired")


@pytest.mark.integration
def test_stale_blocks_go_at_start_and_live_ones_at_exit(
    socket_dir: Path,
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
    admin_hosts: bytes,
) -> None:
    hosts = socket_dir / "hosts"
    hosts.write_bytes(admin_hosts + block(A, "10.1.2.3 db1") + b"10.9.9.7 last\n")
    daemon = start_firewalld(lease=30)
    assert hosts.read_bytes() == admin_hosts + b"10.9.9.7 last\n"
    assert f"removed 1 stale session blocks from {hosts}" in daemon.log
    # Closed after the daemon's end: the socket file is gone, the client only forgets it.
    with root_session(daemon, listen, [("db1", "10.1.2.3")]):
        assert daemon.stop() == 0  # SIGTERM: every session is closed, its block removed
        assert hosts.read_bytes() == admin_hosts + b"10.9.9.7 last\n"

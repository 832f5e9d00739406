"""shuttle_local.netns for real: ids through a user namespace's map, our uid as firewalld
sees it from inside `unshare -r`, and entering a named namespace (in a process of its own:
it moves the thread that calls it)."""

import os
import secrets
import subprocess
import sys
from typing import Iterator

import pytest
from shuttle_local.netns import NETNS_DIR, identity_of, mapped

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
ENTER = """\
import sys
from shuttle_local.netns import enter_named, identity_of
try:
    enter_named(sys.argv[1], "shuttle-client")
except ValueError as exc:
    print(exc)
else:
    print(identity_of("/proc/thread-self/ns/net"))
"""


def python(*argv: str, wrap: tuple[str, ...] = ()) -> str:
    done = subprocess.run(
        [*wrap, sys.executable, "-c", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def named() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"shuttle-lnt-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def test_ids_go_through_a_map_both_ways() -> None:
    text = "0 1000 1\n1 100000 65536\n"
    assert [mapped(text, outer) for outer in (1000, 100000, 165535, 165536, 0)] == [
        0,
        1,
        65536,
        None,
        None,
    ]
    assert [mapped(text, inner, outward=True) for inner in (0, 1, 65536, 65537)] == [
        1000,
        100000,
        165535,
        None,
    ]
    assert mapped("garbage\n0 0\n", 0) is None


def test_our_uid_is_the_one_outside_a_user_namespace() -> None:
    code = "import os; from shuttle_local.netns import outer_uid; print(os.getuid(), outer_uid())"
    assert python(code) == f"{os.getuid()} {os.getuid()}"
    if os.geteuid() != 0:
        pytest.skip("needs root for setpriv")
    inside = ("unshare", "--map-root-user", "--net")
    assert python(code, wrap=(*NOBODY, *inside)) == "0 65534"


def test_root_enters_a_named_namespace_and_others_are_told_how(named: str) -> None:
    assert python(ENTER, named) == str(identity_of(f"{NETNS_DIR}/{named}"))
    assert python(ENTER, named, wrap=tuple(NOBODY)) == (
        f"--namespace {named}: only root can enter a network namespace; start the client in "
        f"it instead: sudo ip netns exec {named} sudo -u nobody shuttle-client ..."
    )
    inside = ("ip", "netns", "exec", named, *NOBODY)
    assert python(ENTER, named, wrap=inside) == str(identity_of(f"{NETNS_DIR}/{named}"))
    assert python(ENTER, "no-such-namespace") == (
        "no network namespace 'no-such-namespace' (/run/netns/no-such-namespace: No such file "
        "or directory); `ip netns list` shows those there are"
    )

"""Fixtures for the integration tests: the user venv (once per run, shared by the parallel
workers), a fresh test network per test, and shuttle-firewalld running in it. Everything is
torn down even when a test fails, and a test whose clients leave a shuttle table or chain
behind fails, as does one that leaves an `ip rule` with a fwmark or a routing table that the
client host did not have before (the tproxy method's policy routing).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `pytest` run without `python -m` does not put the repo first
    sys.path.insert(0, str(REPO))

from testbed import (  # noqa: E402
    METHODS,
    LocalUser,
    Shuttle,
    StartupError,
    Topology,
    UserVenv,
    ensure_second_user,
    ensure_user,
)

TOOLS = (
    "ip",
    "iptables-save",
    "ip6tables-save",
    "nft",
    "setpriv",
    "ssh",
    "ssh-keygen",
    "curl",
    "useradd",
    "usermod",
    "ss",
)


@pytest.fixture(scope="session")
def local_user() -> LocalUser:
    if os.geteuid() != 0:
        pytest.skip("integration tests need root (network namespaces, sshd, firewall)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing or not Path("/usr/sbin/sshd").exists():
        pytest.skip(f"integration tests need these tools: {missing or ['sshd']}")
    return ensure_user()


@pytest.fixture(scope="session")
def second_user(local_user: LocalUser) -> LocalUser:
    """Another unprivileged user, a member of the first one's group (firewalld admits it)."""
    return ensure_second_user(local_user)


@pytest.fixture(scope="session")
def user_venv(local_user: LocalUser, shared_dir: Path) -> UserVenv:
    """The four packages, installed (not editable) where the test user can run them; one venv
    for all the run's workers, removed with the shared directory."""
    return UserVenv.shared(shared_dir)


@pytest.fixture
def topo(local_user: LocalUser, second_user: LocalUser) -> Iterator[Topology]:
    """A fresh test network; its teardown fails the test if anything is left behind."""
    with Topology.up(local_user, second_user) as topology:
        yield topology


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    """Each firewall method in turn: nft (a table per session) and nat (iptables chains)."""
    return str(request.param)


@pytest.fixture
def shuttle(topo: Topology, user_venv: UserVenv) -> Iterator[Shuttle]:
    """shuttle-firewalld running in the client host; tests start clients with it."""
    runner = Shuttle(topo, user_venv, lease=3)
    left_by_clients: list[str] = []
    left_by_firewalld: list[str] = []
    try:
        try:
            runner.start_firewalld()
        except StartupError as exc:
            pytest.fail(str(exc))
        yield runner
    finally:
        problems = runner.stop_clients()
        try:
            # The stopped clients close their sessions; a killed one's lease runs out.
            # (Firewall rules, and fwmark rules and routing tables new since firewalld's start.)
            left_by_clients = runner.wait_rules_gone(timeout=runner.lease + 5)
        finally:
            problems += runner.stop_firewalld()
        left_by_firewalld = runner.leftovers()
    if left_by_clients:
        problems.append("shuttle rules or routing left after the clients stopped:")
        problems += left_by_clients
    if left_by_firewalld:
        problems.append("shuttle rules or routing left after shuttle-firewalld stopped:")
        problems += left_by_firewalld
    assert not problems, "\n".join(problems) + "\n" + runner.outputs()

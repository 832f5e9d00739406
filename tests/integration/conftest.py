"""Fixtures for the integration tests: the user venv (once per run, shared by the parallel
workers), a fresh test network per test, and shuttle-firewalld running in it. Everything is
torn down even when a test fails, and a test whose clients leave a shuttle table or chain
behind fails, as does one that leaves an `ip rule` with a fwmark or a routing table that the
client host did not have before (the tproxy method's policy routing).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, Iterator, Optional

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
from testbed.procs import wait_until  # noqa: E402

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


class SharedNetwork:
    """One test network that the tests of a module take in turn: each gets it as it was built.

    A test that leaves it otherwise (Topology.state differs once its processes have had time
    to end), or that fails, has it torn down after it; the next test gets a fresh one. So only
    modules whose tests leave nothing gain: a shuttle client leaves its runtime directory, and
    the nat method iptables' empty nat table, which cost a wait and a rebuild after each test.
    """

    def __init__(self, user: LocalUser, user2: LocalUser):
        self.user = user
        self.user2 = user2
        self._stack = contextlib.ExitStack()
        self._topology: Optional[Topology] = None
        self._built: Dict[str, str] = {}

    def take(self) -> Topology:
        if self._topology is None:
            self._topology = self._stack.enter_context(Topology.up(self.user, self.user2))
            self._built = self._topology.state()
        return self._topology

    def give_back(self, passed: bool) -> None:
        topology = self._topology
        if topology is None:
            return
        if not passed or not wait_until(lambda: topology.state() == self._built, 5, 0.2):
            self.close()

    def close(self) -> None:
        """Tear the network down (raises, as Topology.up does, if anything is left)."""
        self._topology = None
        stack, self._stack = self._stack, contextlib.ExitStack()
        stack.close()


@pytest.fixture(scope="module")
def shared_network(local_user: LocalUser, second_user: LocalUser) -> Iterator[SharedNetwork]:
    network = SharedNetwork(local_user, second_user)
    try:
        yield network
    finally:
        network.close()


@pytest.fixture
def topo(
    request: pytest.FixtureRequest, local_user: LocalUser, second_user: LocalUser
) -> Iterator[Topology]:
    """A fresh test network; its teardown fails the test if anything is left behind.

    In a module marked shared_network, whose tests only look at the network, the tests take
    turns on one network instead (SharedNetwork): each finds it as built, and building one per
    test was most of such a test's time.
    """
    if request.node.get_closest_marker("shared_network") is None:
        with Topology.up(local_user, second_user) as topology:
            yield topology
        return
    network: SharedNetwork = request.getfixturevalue("shared_network")
    failed = request.session.testsfailed
    yield network.take()
    network.give_back(passed=request.session.testsfailed == failed)


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    """Each firewall method in turn: nft (a table per session) and nat (iptables chains)."""
    return str(request.param)


@pytest.fixture
def shuttle(
    topo: Topology, user_venv: UserVenv, request: pytest.FixtureRequest
) -> Iterator[Shuttle]:
    """shuttle-firewalld running in the client host; tests start clients with it. Its lease
    is 3 s, or what the test gives (parametrize "shuttle" with indirect=True)."""
    runner = Shuttle(topo, user_venv, lease=getattr(request, "param", 3))
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

"""Fixtures for the integration tests: the user venv (once per session), a fresh test network
per test, and shuttle-firewalld running in it. Everything is torn down even when a test fails.
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

from testbed import LocalUser, Shuttle, StartupError, Topology, UserVenv, ensure_user  # noqa: E402

TOOLS = ("ip", "iptables-save", "nft", "setpriv", "ssh", "ssh-keygen", "curl", "useradd", "ss")


@pytest.fixture(scope="session")
def local_user() -> LocalUser:
    if os.geteuid() != 0:
        pytest.skip("integration tests need root (network namespaces, sshd, firewall)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing or not Path("/usr/sbin/sshd").exists():
        pytest.skip(f"integration tests need these tools: {missing or ['sshd']}")
    return ensure_user()


@pytest.fixture(scope="session")
def user_venv(local_user: LocalUser) -> Iterator[UserVenv]:
    """The four packages, installed (not editable) where the test user can run them."""
    venv = UserVenv.build()
    try:
        yield venv
    finally:
        venv.remove()


@pytest.fixture
def topo(local_user: LocalUser) -> Iterator[Topology]:
    """A fresh test network; its teardown fails the test if anything is left behind."""
    with Topology.up(local_user) as topology:
        yield topology


@pytest.fixture
def shuttle(topo: Topology, user_venv: UserVenv) -> Iterator[Shuttle]:
    """shuttle-firewalld running in the client host; tests start clients with it."""
    runner = Shuttle(topo, user_venv, lease=3)
    try:
        try:
            runner.start_firewalld()
        except StartupError as exc:
            pytest.fail(str(exc))
        yield runner
    finally:
        problems = runner.stop()
    assert not problems, "\n".join(problems) + "\n" + runner.outputs()

"""Fixtures of the client's tests: a stand-in for ssh that runs the remote command here; and
the real shuttle-firewalld in a namespace, as firewalld's tests start it, for the tests of
FirewallSession (test_firewall_session)."""

from pathlib import Path

import pytest
from firewalld.conftest import listen, netns, socket_dir, start_firewalld  # noqa: F401

FAKE_SSH = """#!/bin/sh
# Stands in for ssh: skips the options, "--" and the destination, runs the command here.
while [ "$1" != "--" ]; do shift; done
shift 2
exec sh -c "$1"
"""


@pytest.fixture
def fake_ssh(tmp_path: Path) -> str:
    path = tmp_path / "fake-ssh"
    path.write_text(FAKE_SSH)
    path.chmod(0o755)
    return str(path)

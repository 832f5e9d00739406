"""Fixtures of the agent's tests: real agent processes, and a network namespace to run them in.

Everything a fixture starts it stops, and everything it creates it removes, whether the test
passed or not.
"""

import os
from typing import Iterator, List, Sequence

import pytest

from .agent_process import SERVER_PYTHON, AgentProcess, Namespace, StartAgent, stop


@pytest.fixture
def agent() -> Iterator[AgentProcess]:
    process = AgentProcess()
    yield process
    stop(process)


@pytest.fixture
def start_agent() -> Iterator[StartAgent]:
    """Start agents with a chosen python, wrapper and extra environment; all are stopped
    afterwards."""
    started: List[AgentProcess] = []

    def start(python: str = SERVER_PYTHON, wrapper: Sequence[str] = (), **env: str) -> AgentProcess:
        process = AgentProcess(python, env, wrapper)
        started.append(process)
        return process

    yield start
    for process in started:
        stop(process)


@pytest.fixture
def netns() -> Iterator[Namespace]:
    """A fresh network namespace: loopback up, and a veth pair v0-v1 (both ends inside, up)
    with 10.9.0.1/24 and 2001:db8:9::1/64 on v0."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    namespace = Namespace()
    try:
        namespace.ip("link", "set", "lo", "up")
        namespace.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
        namespace.ip("link", "set", "v0", "up")
        namespace.ip("link", "set", "v1", "up")
        namespace.ip("address", "add", "10.9.0.1/24", "dev", "v0")
        namespace.ip("-6", "address", "add", "2001:db8:9::1/64", "dev", "v0", "nodad")
        namespace.wait_link_locals(["v0", "v1"])
        yield namespace
    finally:
        namespace.remove()

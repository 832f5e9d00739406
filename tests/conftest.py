"""Hooks of the whole suite: a directory that the parallel workers of a run (pytest -n, as
`make test` runs it) share, made by the run's first process and removed by it at the end.

Its name carries that process's pid, as the testbed's temporary directories do, so a later
run removes it if this one was killed (testbed.topology.remove_stale_dirs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

SHARED = pytest.StashKey[Path]()
WORKER_INPUT = "shuttle_shared_dir"


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    if _is_worker(config):
        config.stash[SHARED] = Path(config.workerinput[WORKER_INPUT])  # type: ignore[attr-defined]
    else:
        config.stash[SHARED] = Path(tempfile.mkdtemp(prefix=f"shuttle-venv-{os.getpid()}-"))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist, in the first process: each worker is told the shared directory."""
    node.workerinput[WORKER_INPUT] = str(node.config.stash[SHARED])


def pytest_unconfigure(config: pytest.Config) -> None:
    if not _is_worker(config) and SHARED in config.stash:
        shutil.rmtree(config.stash[SHARED], ignore_errors=True)


@pytest.fixture(scope="session")
def shared_dir(pytestconfig: pytest.Config) -> Path:
    """The run's shared directory: what every worker would build alike is built once here."""
    return pytestconfig.stash[SHARED]

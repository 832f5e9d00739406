"""Hooks of the whole suite: a directory that the parallel workers of a run (pytest -n, as
`make test` runs it) share, made by the run's first process and removed by it at the end;
and, as root, the check that other users can run this checkout's python at all.

Its name carries that process's pid, as the testbed's temporary directories do, so a later
run removes it if this one was killed (testbed.topology.remove_stale_dirs).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
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
        _others_can_run_us()
        config.stash[SHARED] = Path(tempfile.mkdtemp(prefix=f"shuttle-venv-{os.getpid()}-"))


def _others_can_run_us() -> None:
    """As root, many tests run this checkout's python as nobody or as throwaway users: a
    checkout they cannot reach (in /root, 0700 on Debian) would fail each of them on its own,
    far from the cause. Said once, at the start."""
    if os.geteuid() != 0:
        return
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    done = subprocess.run(
        [*argv, "-c", "import zmq, shuttle_client"], capture_output=True, timeout=60, check=False
    )
    if done.returncode == 0:
        return
    here = Path(__file__).resolve().parent
    closed = [d for d in (here, *here.parents) if not os.stat(d).st_mode & stat.S_IXOTH]
    where = ""
    if closed:  # the outermost: /root, say
        where = f" ({closed[-1]} is mode {stat.S_IMODE(os.stat(closed[-1]).st_mode):o})"
    raise pytest.UsageError(
        f"other users cannot run {sys.executable} with this checkout{where}; the tests run it "
        "as nobody and as throwaway users: clone shuttle where every user can read it (under "
        "/srv or /opt, not /root), or make each directory on the way searchable (chmod o+x)"
    )


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failure that says "no answer within" (a zmq request to firewalld; rare under a
    loaded run, and not explained yet: the connection was never made) carries what this
    worker's threads were doing, libzmq's I/O threads among them."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and "no answer within" in str(call.excinfo):
        report.sections.append(("the worker's threads", _threads()))


def _threads() -> str:
    """Each thread of this process: its name, state, system call, wait channel, network
    namespace; and how many descriptors the process has open."""
    lines = [f"open descriptors: {len(os.listdir('/proc/self/fd'))}"]
    for tid in sorted(os.listdir("/proc/self/task"), key=int):
        task = Path("/proc/self/task") / tid
        facts = [tid]
        for name in ("comm", "wchan", "syscall"):
            try:
                facts.append((task / name).read_text().strip())
            except OSError as exc:
                facts.append(f"({name}: {exc.strerror})")
        try:
            facts.append(os.readlink(task / "ns" / "net"))
        except OSError:
            pass
        lines.append(" | ".join(facts))
    return "\n".join(lines)

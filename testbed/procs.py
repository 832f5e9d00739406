"""Running commands with bounded time, and background processes that log to a file.

Every process is started in its own session (process group), so a timeout or a teardown
can kill it together with its children.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Callable, Optional, Sequence, cast

POLL = 0.05


class CommandError(RuntimeError):
    """A command failed or timed out; the message carries its output."""


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = POLL) -> bool:
    """Poll predicate until it is true or timeout seconds pass (bounded in count and time)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if predicate():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return predicate()


def _kill_group(popen: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    check: bool = False,
    stdin: Optional[bytes] = None,
    cwd: Optional[Path] = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv to completion; on timeout kill its whole process group and raise."""
    popen = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd=cwd,
    )
    try:
        out, err = popen.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(popen)
        out, err = popen.communicate(timeout=10)
        raise CommandError(
            f"timed out after {timeout}s: {shlex.join(argv)}\n"
            f"stdout: {out.decode(errors='replace')}\nstderr: {err.decode(errors='replace')}"
        ) from None
    finally:
        _kill_group(popen)  # no stray children of a finished command
    result = subprocess.CompletedProcess(
        list(argv), popen.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )
    if check and result.returncode != 0:
        raise CommandError(
            f"exit {result.returncode}: {shlex.join(argv)}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


class Proc:
    """A background process whose stdout and stderr go to one log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, cwd: Optional[Path] = None):
        self.name = name
        self.argv = list(argv)
        self.log = log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=cwd,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for_line(self, prefix: str, timeout: float) -> bool:
        """Wait until a log line starts with prefix; False on timeout or if the process exits."""

        def seen() -> bool:
            return any(line.startswith(prefix) for line in self.output().splitlines())

        def done() -> bool:
            return seen() or not self.alive()

        wait_until(done, timeout)
        return seen()

    def send(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> Optional[int]:
        """Signal the process, wait for it, then kill whatever is left of its group.

        Returns the exit code from the signal, or None if it had to be killed.
        """
        code: Optional[int] = self.popen.poll()
        if code is None:
            self.send(sig)
            code = self.wait(timeout)
        _kill_group(self.popen)
        if self.popen.poll() is None:
            self.popen.wait(10)
        return code

    def describe(self) -> str:
        return f"--- {self.name} ({shlex.join(self.argv)}) ---\n{self.output()}"


class Dialogue:
    """A process spoken to line by line: its stdin and stdout are pipes (a thread reads the
    lines as they come), its stderr is kept for the error when it stops short. Every wait for
    a line is bounded by timeout."""

    def __init__(self, argv: Sequence[str], timeout: float = 30.0):
        self.timeout = timeout
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        # Pipes, as asked above (Popen's types allow None).
        self._stdin, self._stdout, self._stderr = (
            cast(IO[str], pipe) for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr)
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._stdout:
            self._lines.put(line)
        self._lines.put("")  # the end

    def tell(self, line: str) -> None:
        self._stdin.write(line + "\n")
        self._stdin.flush()

    def line(self) -> str:
        """The next line the process prints; CommandError, with what it wrote to stderr, if
        it ends first or prints nothing within timeout."""
        try:
            line = self._lines.get(timeout=self.timeout)
        except queue.Empty:
            line = ""
        if not line:
            raise CommandError(f"no line from {shlex.join(self.argv)}: {self.close()}")
        return line

    def close(self) -> str:
        """Kill the process if it still runs, and close its pipes; what it wrote to stderr
        (once: "" after that)."""
        _kill_group(self.popen)  # type: ignore[arg-type]
        if self._stderr.closed:
            return ""
        try:
            self.popen.wait(10)
            error = self._stderr.read()
        except subprocess.TimeoutExpired:  # unkillable: leave its pipes be
            return ""
        self._reader.join(10)  # it ends at the end of stdout
        for pipe in (self._stdin, self._stdout, self._stderr):
            with contextlib.suppress(OSError):  # stdin: the process left unread bytes
                pipe.close()
        return error

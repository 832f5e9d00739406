"""Running the firewall tools: an argument list (never a shell), bounded in time.

A failure becomes one RequestError line naming the tool and its first line of complaint.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence

from shuttle_firewalld.errors import RequestError

TIMEOUT = 60.0  # iptables-restore of tens of thousands of rules takes seconds, not minutes

# What methods call to run a tool: (argv, stdin) -> stdout. Tests pass a fake.
Runner = Callable[[Sequence[str], str], str]


def run_tool(argv: Sequence[str], stdin: str = "") -> str:
    """Run argv with stdin; return its stdout, or raise RequestError if it fails."""
    try:
        done = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RequestError(f"{argv[0]} failed: {exc}") from None
    if done.returncode != 0:
        complaint = next((line for line in done.stderr.splitlines() if line.strip()), "")
        raise RequestError(f"{argv[0]} failed (exit {done.returncode}): {complaint:.300}")
    return done.stdout

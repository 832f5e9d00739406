"""`shuttle-client ctl` as a test user runs it in C, for the tests that read what it says."""

from __future__ import annotations

import json
import subprocess
from typing import Any, Optional

from testbed import Shuttle
from testbed.user import LocalUser

WAIT = 15.0  # bound on what should happen at once (the namespaces are slow at times)


def ctl(
    shuttle: Shuttle, *args: str, user: Optional[LocalUser] = None
) -> subprocess.CompletedProcess[str]:
    """`shuttle-client ctl ARGS` as user (default the first test user) in C."""
    argv = [shuttle.venv.program("shuttle-client"), "ctl", *args]
    return shuttle.topo.run_as_user(argv, timeout=WAIT + 30, user=user)


def ctl_json(shuttle: Shuttle, *args: str) -> Any:
    """What `ctl --json ARGS` prints, parsed; the command must succeed."""
    result = ctl(shuttle, "--json", *args)
    assert result.returncode == 0, (
        f"ctl {' '.join(args)}: exit {result.returncode}: {result.stderr}\n{shuttle.outputs()}"
    )
    return json.loads(result.stdout)

"""The open-file limit: raised to the hard limit, in a child process (limits are per process)."""

import subprocess
import sys

SCRIPT = """
import resource
from shuttle_ends.limits import raise_open_files
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))
print(raise_open_files(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
print(raise_open_files())
"""


def test_the_soft_limit_goes_up_to_the_hard_limit() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    assert out == ["4096", "4096", "4096"]

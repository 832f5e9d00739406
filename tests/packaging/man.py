"""man -l, as the packaging tests read a man page."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path


def man_text(path: Path) -> str:
    """The page in path as man -l prints it, plain text, one long line per paragraph; man's
    and groff's warnings fail the test."""
    man = shutil.which("man")
    assert man is not None, "man is missing (make dev installs man-db)"
    done = subprocess.run(
        [man, "--warnings", "-l", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"MANWIDTH": "200", "PATH": "/usr/bin:/bin"},
    )
    assert (done.returncode, done.stderr) == (0, "")
    # Bold and underline are overstrikes (c\bc, _\bc) when man writes to a pipe.
    return re.sub(r".\x08", "", done.stdout)

"""Run inside a private mount namespace (unshare -m) by test_install.py: make install and
make uninstall for real, DESTDIR empty, into the system's own paths. /usr/local there is an
empty tmpfs and /etc an overlay whose writes land in a directory of the test's, so the
machine outside sees neither. Prints what the test checks, as JSON.

    python -m tests.packaging.in_namespace DIR MAKE_ARG...
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)


def group_line() -> str:
    """firewalld's group in /etc/group, "" if there is none."""
    lines = Path("/etc/group").read_text().splitlines()
    return next((line for line in lines if line.startswith("shuttle:")), "")


def local_files() -> list[str]:
    """What is in /usr/local, the venv aside."""
    return sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk("/usr/local")
        for name in names
        if not (folder + "/").startswith("/usr/local/lib/shuttle/")
    )


def main(directory: Path, make: list[str]) -> dict[str, object]:
    for name in ("upper", "work"):
        (directory / name).mkdir()
    overlay = f"lowerdir=/etc,upperdir={directory / 'upper'},workdir={directory / 'work'}"
    for argv in (
        ["mount", "-t", "tmpfs", "tmpfs", "/usr/local"],
        ["mount", "-t", "overlay", "overlay", "-o", overlay, "/etc"],
    ):
        subprocess.run(argv, check=True, timeout=60)
    report: dict[str, object] = {"group_before": group_line()}
    installed = run(*make, "install")
    report["install"] = [installed.returncode, installed.stdout, installed.stderr]
    report["which"] = {
        program: shutil.which(program, path="/usr/local/bin:/usr/bin:/bin")
        for program in ("shuttle-client", "shuttle-firewalld", "shuttle-agent")
    }
    report["versions"] = [
        run(program, "--version").stdout for program in ("shuttle-client", "shuttle-firewalld")
    ]
    report["man"] = [
        run("man", "-w", page).stdout for page in ("shuttle-client", "shuttle-firewalld")
    ]
    report["group"] = group_line()
    report["files"] = local_files()
    removed = run(*make, "uninstall")
    report["uninstall"] = [removed.returncode, removed.stdout, removed.stderr]
    report["files_after"] = local_files()
    report["group_after"] = group_line()
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2:])))

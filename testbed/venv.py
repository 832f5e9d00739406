"""A venv of the four shuttle packages that the unprivileged test user can execute.

The repository may sit under a directory other users cannot traverse (/root is 0700; CI
clones anywhere), so the venv is built in its own world-traversable temporary directory, with
a regular (not editable) install of copies of the packages, which also tests the packaging.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from testbed.config import PACKAGES, SYSTEM_PYTHON
from testbed.locks import locked
from testbed.procs import run

REPO = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns("*.egg-info", "__pycache__", "build", "dist", ".*cache")


def _open_up(root: Path) -> None:
    """Make every file readable and every directory traversable by other users."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o044 | (0o011 if path.is_dir() else 0))
    root.chmod(0o755)


class UserVenv:
    """A built venv; remove() deletes it with its temporary directory."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / "venv"
        self.bin = self.path / "bin"

    @classmethod
    def build(cls, repo: Path = REPO, timeout: float = 900) -> UserVenv:
        root = Path(tempfile.mkdtemp(prefix=f"shuttle-venv-{os.getpid()}-"))
        venv = cls(root)
        try:
            venv._install(repo, timeout)
        except BaseException:
            venv.remove()
            raise
        return venv

    @classmethod
    def shared(cls, root: Path, repo: Path = REPO, timeout: float = 900) -> UserVenv:
        """The venv in root (a directory its owner removes), built by the first process that
        asks; the parallel workers of a test run share one instead of each building its own.
        """
        with locked(root / "lock", timeout=timeout + 60):
            venv = cls(root)
            built = root / "built"
            if not built.exists():
                venv._install(repo, timeout)  # after a failed attempt: on its leftovers
                built.touch()
            return venv

    def _install(self, repo: Path, timeout: float) -> None:
        self.root.chmod(0o755)
        src = self.root / "src"
        shutil.rmtree(src, ignore_errors=True)
        for package in PACKAGES:
            shutil.copytree(repo / package, src / package, ignore=IGNORE)
        run([SYSTEM_PYTHON, "-m", "venv", "--clear", str(self.path)], timeout=120, check=True)
        run(
            [
                str(self.bin / "pip"),
                "install",
                "--quiet",
                "--no-input",
                *(str(src / package) for package in PACKAGES),
            ],
            timeout=timeout,
            check=True,
            cwd=self.root,
        )
        shutil.rmtree(src)
        _open_up(self.root)

    def program(self, name: str) -> str:
        return str(self.bin / name)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def missing_programs(self) -> Optional[str]:
        """Name the shuttle programs whose entry point cannot be imported, if any."""
        code = (
            "import importlib.util as u, sys; "
            "print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))"
        )
        result = run(
            [
                str(self.bin / "python"),
                "-c",
                code,
                "shuttle_client.main",
                "shuttle_firewalld.main",
            ],
            timeout=60,
        )
        return (result.stdout.strip() or result.stderr.strip()) or None

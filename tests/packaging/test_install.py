"""make install and make uninstall, run for real into a throwaway root (DESTDIR) with an
/etc of its own, and make dist, whose wheels that install puts in a fresh venv with one
`pip install dist/*.whl`, and pipx the client's. One install per test run, shared by the
parallel workers; the uninstall tests work on copies of it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
from shuttle_client.upload import bundle_modules
from shuttle_protocol.stream import StreamDecoder
from shuttle_protocol.stream_messages import Hello

from testbed.config import PACKAGES as DISTRIBUTIONS
from testbed.locks import locked

from .man import man_text

ROOT = Path(__file__).parents[2]
PROGRAMS = ("shuttle-client", "shuttle-firewalld", "shuttle-agent")
# A distribution packages install to /usr, and systemd looks there too.
PREFIX = "/usr"
LIBDIR = f"{PREFIX}/lib/shuttle"
# Each of them, where install puts it (under the root).
INSTALLED = {
    *(f"usr/bin/{program}" for program in PROGRAMS),
    "usr/lib/systemd/system/shuttle-firewalld.service",
    "usr/lib/systemd/user/shuttle-client@.service",
    "usr/lib/tmpfiles.d/shuttle.conf",
    "usr/share/man/man1/shuttle-client.1",
    "usr/share/man/man8/shuttle-firewalld.8",
}
ETC = {
    "passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "shadow": "root:*:1::::::\n",
    "group": "root:x:0:\n",
    "gshadow": "root:*::\n",
}

pytestmark = pytest.mark.integration


def make(
    *args: str, root: Path, dist: Path | None = None, umask: int = 0o022
) -> subprocess.CompletedProcess[str]:
    """make in the clone, into root; the dev venv running this test is taken as it is (-o:
    never rebuilt under the running tests)."""
    venv = Path(sys.prefix)
    variables = [f"DESTDIR={root}", f"PREFIX={PREFIX}", f"VENV={venv}"]
    if dist is not None:
        variables += [f"DIST={dist / 'dist'}", f"BUILD={dist / 'build'}"]
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), "-o", f"{venv}/.installed", *args, *variables],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        umask=umask,
    )


@dataclass(frozen=True)
class Staged:
    """A make install into root, from the wheels in dist."""

    root: Path
    dist: Path

    @property
    def python(self) -> str:
        """The installed venv's python: run from root, it still finds its own packages."""
        return str(self.root / LIBDIR.lstrip("/") / "bin" / "python")

    def script(self, program: str) -> str:
        return str(self.root / LIBDIR.lstrip("/") / "bin" / program)

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """The installed python on argv, its input empty (a pipe: the agent polls it)."""
        return subprocess.run(
            [self.python, *argv],
            input="",
            capture_output=True,
            text=True,
            encoding="latin-1",
            timeout=60,
            check=False,
        )


@pytest.fixture(scope="session")
def staged(shared_dir: Path) -> Staged:
    here = shared_dir / "install"
    with locked(shared_dir / "install.lock", timeout=660):
        staged = Staged(here / "root", here / "dist")
        if not (here / "done").exists():
            shutil.rmtree(here, ignore_errors=True)
            (staged.root / "etc").mkdir(parents=True)
            for name, text in ETC.items():
                (staged.root / "etc" / name).write_text(text)
            # With root's strictest umask: the venv must still be there for every user.
            done = make("install", root=staged.root, dist=here, umask=0o077)
            assert done.returncode == 0, done.stdout + done.stderr
            (here / "done").touch()
        return staged


def files(root: Path) -> set[str]:
    """Everything under root but directories, the venv and /etc, relative to root."""
    found = set()
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.relpath(os.path.join(folder, name), root)
            if not path.startswith(("etc/", LIBDIR.lstrip("/") + "/")):
                found.add(path)
    return found


def test_install_puts_each_file_in_place(staged: Staged) -> None:
    assert files(staged.root) == INSTALLED
    for program in PROGRAMS:
        # Linked to where the venv will be once the root is /, and its scripts point there.
        link = staged.root / "usr" / "bin" / program
        assert os.readlink(link) == f"{LIBDIR}/bin/{program}"
        script = staged.root / LIBDIR.lstrip("/") / "bin" / program
        assert script.read_text().splitlines()[0] == f"#!{LIBDIR}/bin/python3"
    for unit, program in [
        ("system/shuttle-firewalld.service", "shuttle-firewalld"),
        ("user/shuttle-client@.service", "shuttle-client"),
    ]:
        text = (staged.root / "usr/lib/systemd" / unit).read_text()
        [exec_start] = re.findall(r"^ExecStart=(\S+)", text, re.MULTILINE)
        assert exec_start == f"{PREFIX}/bin/{program}"
    # Root's alone to change (firewalld runs it as root), everyone's to read and run.
    venv = staged.root / LIBDIR.lstrip("/")
    wrong = {}
    for path in [venv, *venv.rglob("*")]:
        mode = path.lstat().st_mode & 0o777
        needed = 0o555 if path.is_dir() else 0o444
        if not path.is_symlink() and (mode & 0o022 or mode & needed != needed):
            wrong[str(path.relative_to(staged.root))] = oct(mode)
    assert wrong == {}
    assert all(path.lstat().st_uid == 0 for path in [venv, *venv.rglob("*")])
    # firewalld's group, a system group, in the root's own /etc.
    [group] = [line for line in (staged.root / "etc/group").read_text().splitlines()[1:]]
    name, _, gid, members = group.split(":")
    assert (name, members) == ("shuttle", "")
    assert int(gid) < 1000


def test_the_tmpfiles_entry_makes_the_socket_directory(staged: Staged, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(staged.root / "usr/lib/tmpfiles.d", root / "usr/lib/tmpfiles.d")
    done = subprocess.run(
        ["systemd-tmpfiles", f"--root={root}", "--create", "shuttle.conf"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    status = (root / "run/shuttle").stat()
    assert (oct(status.st_mode), status.st_uid, status.st_gid) == (oct(0o40755), 0, 0)


def test_dist_has_a_wheel_and_an_sdist_of_each_distribution(staged: Staged) -> None:
    names = [
        tomllib.loads((ROOT / package / "pyproject.toml").read_text())["project"]["name"]
        for package in DISTRIBUTIONS
    ]
    built = sorted(path.name for path in staged.dist.iterdir())
    assert built == sorted(
        [f"{name}-0.1.0.tar.gz" for name in names]
        + [f"{name.replace('-', '_')}-0.1.0-py3-none-any.whl" for name in names]
    )
    # pip install dist/*.whl put exactly those in the venv, not the clone's editable ones.
    done = staged.run("-m", "pip", "list", "--format=json", "--exclude-editable")
    installed = {item["name"]: item["version"] for item in json.loads(done.stdout)}
    assert {name: installed.get(name) for name in names} == dict.fromkeys(names, "0.1.0")


def test_pipx_installs_the_client_from_the_wheels(staged: Staged, tmp_path: Path) -> None:
    # As the README says, into a throwaway pipx home; the third-party wheels come from where
    # make install's pip found them (this machine's pip configuration).
    [wheel] = staged.dist.glob("shuttle_client-*.whl")
    home, bin_dir = tmp_path / "pipx", tmp_path / "bin"
    env = {**os.environ, "PIPX_HOME": str(home), "PIPX_BIN_DIR": str(bin_dir)}
    env["PIPX_MAN_DIR"] = str(tmp_path / "man")
    done = subprocess.run(
        ["pipx", "install", f"--pip-args=--find-links {staged.dist}", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    program = bin_dir / "shuttle-client"
    assert program.resolve().is_relative_to(home)
    shown = subprocess.run(
        [str(program), "-V"], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert (shown.returncode, shown.stdout, shown.stderr) == (0, "shuttle-client 0.1.0\n", "")
    # Its own venv's copy from the wheel, not the clone's editable one.
    [python] = home.glob("venvs/shuttle-client/bin/python")
    where = subprocess.run(
        [str(python), "-c", "import shuttle_client; print(shuttle_client.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert Path(where.stdout.strip()).is_relative_to(home), where.stdout + where.stderr


@pytest.mark.parametrize("program", ["shuttle-client", "shuttle-firewalld"])
def test_each_installed_program_runs(staged: Staged, program: str) -> None:
    done = staged.run(staged.script(program), "--help")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith(f"{program}: ")


def test_the_installed_agent_greets_and_ends_with_its_input(staged: Staged) -> None:
    done = staged.run(staged.script("shuttle-agent"))
    assert (done.returncode, done.stderr) == (0, "")
    [hello] = StreamDecoder().feed(done.stdout.encode("latin-1"))
    assert isinstance(hello, Hello)


def test_the_wheels_carry_every_module_of_the_clone(staged: Staged) -> None:
    # Each pyproject.toml names its packages one by one: a new subpackage must be added there.
    [site] = (staged.root / LIBDIR.lstrip("/") / "lib").glob("python3*/site-packages")
    for distribution in DISTRIBUTIONS:
        [package] = (ROOT / distribution).glob("shuttle_*/__init__.py")
        name = package.parent.name
        clone = {
            str(path.relative_to(ROOT / distribution)) for path in package.parent.rglob("*.py")
        }
        installed = {str(path.relative_to(site)) for path in (site / name).rglob("*.py")}
        assert installed == clone, name
        assert (site / name / "py.typed").exists()


def test_the_installed_client_uploads_the_whole_agent(staged: Staged) -> None:
    # The bundle built from the installed packages has every module of the clone's, alike.
    code = "import json,shuttle_client.upload as u;print(json.dumps(u.bundle_modules()))"
    done = staged.run("-c", code)
    assert done.returncode == 0, done.stderr
    clone = {name: [is_package, source] for name, (is_package, source) in bundle_modules().items()}
    assert json.loads(done.stdout) == clone


@pytest.mark.parametrize(
    ("page", "program"),
    [
        ("man1/shuttle-client.1", "shuttle-client"),
        ("man8/shuttle-firewalld.8", "shuttle-firewalld"),
    ],
)
def test_man_shows_the_installed_pages(staged: Staged, page: str, program: str) -> None:
    text = man_text(staged.root / "usr/share/man" / page)
    section = page[3]
    assert text.startswith(f"{program.upper()}({section})")
    assert f"{program} 0.1.0" in text
    assert "--help" in text


def copy(staged: Staged, tmp_path: Path) -> Path:
    """The staged root, to uninstall from, but for the venv's packages: uninstall removes the
    venv whole, whatever is in it, and they are most of its files."""
    root = tmp_path / "root"
    site_packages = staged.root / LIBDIR.lstrip("/") / "lib"
    shutil.copytree(
        staged.root,
        root,
        symlinks=True,
        ignore=lambda folder, names: names if Path(folder) == site_packages else [],
    )
    return root


def test_uninstall_leaves_nothing(staged: Staged, tmp_path: Path) -> None:
    root = copy(staged, tmp_path)
    done = make("uninstall", root=root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert files(root) == set()
    assert not (root / LIBDIR.lstrip("/")).exists()
    assert (root / "etc/group").read_text() == ETC["group"]


@pytest.mark.parametrize("member", ["supplementary", "primary"])
def test_uninstall_keeps_a_group_that_has_members(
    staged: Staged, tmp_path: Path, member: str
) -> None:
    root = copy(staged, tmp_path)
    group = root / "etc/group"
    gid = group.read_text().split("shuttle:x:")[1].split(":")[0]
    if member == "supplementary":
        group.write_text(group.read_text().replace(f"shuttle:x:{gid}:", f"shuttle:x:{gid}:alice"))
    else:
        with (root / "etc/passwd").open("a") as passwd:
            passwd.write(f"alice:x:1500:{gid}::/home/alice:/bin/sh\n")
    before = group.read_text()
    done = make("uninstall", root=root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == "the group shuttle has members and stays: groupdel shuttle removes it\n"
    assert files(root) == set()
    assert group.read_text() == before


def test_uninstall_removes_only_a_directory_of_its_own(staged: Staged, tmp_path: Path) -> None:
    root = copy(staged, tmp_path)
    done = make("uninstall", "LIBDIR=/usr/lib", root=root)
    assert done.returncode == 2
    assert "LIBDIR must be an absolute path ending in /shuttle, not '/usr/lib'" in done.stdout
    assert files(root) == INSTALLED


def test_a_real_install_puts_the_programs_on_path(staged: Staged, tmp_path: Path) -> None:
    # DESTDIR empty, as root does it: in a mount namespace of its own (in_namespace.py), from
    # the wheels and man pages already built (-o: not made again).
    venv = Path(sys.prefix)
    make = ["make", "-s", "-C", str(ROOT), "-o", f"{venv}/.installed", "-o", "dist", "-o", "man"]
    make += [f"VENV={venv}", f"DIST={staged.dist}", f"BUILD={staged.dist.parent / 'build'}"]
    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            sys.executable,
            "-m",
            "tests.packaging.in_namespace",
            str(tmp_path),
            *make,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["install"][0] == 0, report["install"]
    assert report["group_before"] == ""
    assert report["which"] == {program: f"/usr/local/bin/{program}" for program in PROGRAMS}
    assert report["versions"] == ["shuttle-client 0.1.0\n", "0.1.0\n"]
    assert report["man"] == [
        "/usr/local/share/man/man1/shuttle-client.1\n",
        "/usr/local/share/man/man8/shuttle-firewalld.8\n",
    ]
    assert report["group"].startswith("shuttle:x:")
    assert report["files"] == sorted(
        "/" + path.replace("usr/", "usr/local/", 1) for path in INSTALLED
    )
    assert report["uninstall"][0] == 0, report["uninstall"]
    assert (report["files_after"], report["group_after"]) == ([], "")


@pytest.mark.parametrize("target", ["install", "uninstall"])
def test_a_user_is_told_to_be_root(target: str, tmp_path: Path) -> None:
    # Before anything is built: dist stays unmade.
    dist = tmp_path / "dist"
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    done = subprocess.run(
        [*nobody, "make", "-s", "-C", str(ROOT), target, f"DIST={dist}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == "make install and uninstall run as root (or stage into DESTDIR=...)\n"
    assert not dist.exists()

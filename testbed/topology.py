"""The three-namespace test network, its servers, and a teardown that leaves nothing behind.

    C (client host) 198.18.1.1 ── 198.18.1.2 S (ssh server) 198.18.2.1 ── 198.18.2.2 T (target)

C routes everything through S, but S does not forward: a packet from C to T is silently
dropped at S, so without shuttle the target just times out. S runs a real sshd; T runs an
HTTP server, an echo server and a bulk server.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

from testbed import servers, sshd
from testbed.config import (
    C_ADDR,
    HTTP_PORT,
    PREFIX_LEN,
    S_ADDR_C,
    S_ADDR_T,
    SYSTEM_PYTHON,
    T_ADDR,
    T_ADDR2,
    check_ours,
)
from testbed.netns import Namespace, list_namespaces, remove_stale
from testbed.procs import Proc, run
from testbed.user import LocalUser, ensure_user

_counter = itertools.count()

SSH_OPTIONS = (
    "-F",
    "/dev/null",
    "-i",
    "{key}",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "BatchMode=yes",
)


RUN_DIR_PREFIX = "shuttle-testbed-"
STALE_DIR_RE = re.compile(r"^shuttle-(?:testbed|venv)-(\d+)-")


def remove_stale_dirs() -> List[str]:
    """Delete temporary directories of earlier runs of this package whose process is gone."""
    removed = []
    for path in Path(tempfile.gettempdir()).iterdir():
        match = STALE_DIR_RE.match(path.name)
        if match and path.is_dir() and not Path(f"/proc/{match.group(1)}").exists():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def curl_argv(host: str, port: int, max_time: float) -> List[str]:
    url = f"http://{check_ours(host)}:{port}/"
    return ["curl", "-sS", "--noproxy", "*", "--max-time", str(max_time), url]


class Topology:
    """One test network. Use `with Topology.up() as topo:`; everything goes at the end."""

    def __init__(self, user: LocalUser, run_dir: Path):
        self.user = user
        self.run_dir = run_dir
        self.prefix = f"sh{os.getpid()}-{next(_counter)}"
        self.c = Namespace(self.prefix + "c")
        self.s = Namespace(self.prefix + "s")
        self.t = Namespace(self.prefix + "t")
        self.ssh_dir = run_dir / "ssh"
        self.user_dir = run_dir / "user"
        self.runtime_dir = self.user_dir / "runtime"
        self.fw_dir = run_dir / "fw"
        self.www_dir = run_dir / "www"
        self.logs = run_dir / "logs"
        self.key = self.user_dir / "id_ed25519"
        self.tcptool_path = run_dir / "tools" / "tcptool.py"
        self.marker = ""
        self.procs: List[Proc] = []

    @property
    def namespaces(self) -> List[Namespace]:
        return [self.c, self.s, self.t]

    # --- building ------------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def up(cls, user: Optional[LocalUser] = None) -> Iterator[Topology]:
        """Build the network, yield it, and tear it down however the block ends."""
        remove_stale()
        remove_stale_dirs()
        run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-"))
        run_dir.chmod(0o755)  # the test user must reach its key, the tools and the socket
        topo = cls(user or ensure_user(), run_dir)
        try:
            topo.build()
            yield topo
        finally:
            problems = topo.teardown()
            if problems:
                raise RuntimeError("teardown left something behind:\n" + "\n".join(problems))

    def build(self) -> None:
        for directory in (self.ssh_dir, self.fw_dir, self.logs):
            directory.mkdir(mode=0o755)
        self._make_user_dir()
        self._make_network()
        authorized = self.ssh_dir / "authorized_keys"
        authorized.write_text((self.user_dir / "id_ed25519.pub").read_text())
        authorized.chmod(0o644)  # sshd reads it with the logging-in user's rights
        config = sshd.write_config(self.ssh_dir, authorized, [self.user.name, "root"])
        self.procs.append(sshd.start(self.s, config, self.logs / "sshd.log"))
        self.marker = servers.write_page(self.www_dir)
        servers.install_tcptool(self.tcptool_path.parent)
        self.procs.extend(servers.start(self.t, self.www_dir, self.tcptool_path, self.logs))

    def _make_user_dir(self) -> None:
        self.user_dir.mkdir(mode=0o700)
        self.runtime_dir.mkdir(mode=0o700)
        run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "testbed", "-f", str(self.key)],
            timeout=30,
            check=True,
        )
        for path in (self.user_dir, self.runtime_dir, self.key, self.key.with_suffix(".pub")):
            os.chown(path, self.user.uid, self.user.gid)
        self.key.chmod(0o600)

    def _make_network(self) -> None:
        for ns in self.namespaces:
            ns.create()
        # The veth pairs are created inside the namespaces: their names never meet the host's.
        self.c.ip(
            "link", "add", "to-s", "type", "veth", "peer", "name", "to-c", "netns", self.s.name
        )
        self.s.ip(
            "link", "add", "to-t", "type", "veth", "peer", "name", "to-s", "netns", self.t.name
        )
        for ns, dev, addr in (
            (self.c, "to-s", C_ADDR),
            (self.s, "to-c", S_ADDR_C),
            (self.s, "to-t", S_ADDR_T),
            (self.t, "to-s", T_ADDR),
            (self.t, "to-s", T_ADDR2),
        ):
            ns.ip("addr", "add", f"{addr}/{PREFIX_LEN}", "dev", dev)
            ns.ip("link", "set", dev, "up")
        self.c.ip("route", "add", "default", "via", S_ADDR_C)
        self.t.ip("route", "add", "default", "via", S_ADDR_T)
        # The point of the topology: S must not route C's packets to T.
        self.s.sysctl("net.ipv4.ip_forward", "0")
        self.s.sysctl("net.ipv4.conf.all.forwarding", "0")

    # --- running things ------------------------------------------------------------------

    def user_env(self, path: Sequence[str] = ()) -> Dict[str, str]:
        return {
            "PATH": ":".join([*path, "/usr/bin", "/bin"]),
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
        }

    def user_argv(self, argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> List[str]:
        """argv run in C as the test user."""
        return self.c.argv(self.user.argv(argv, env if env is not None else self.user_env()))

    def run_as_user(
        self, argv: Sequence[str], *, timeout: float = 30, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        return run(self.user_argv(argv), timeout=timeout, check=check, cwd=self.user_dir)

    def start(self, name: str, argv: Sequence[str]) -> Proc:
        """Start a long-running process (argv already complete); it is stopped at teardown."""
        proc = Proc(name, argv, self.logs / f"{name}.log", cwd=self.user_dir)
        self.procs.append(proc)
        return proc

    def curl(
        self, host: str = T_ADDR, port: int = HTTP_PORT, max_time: float = 2
    ) -> subprocess.CompletedProcess[str]:
        """curl http://host:port/ in C as the test user (the traffic shuttle captures)."""
        return self.run_as_user(curl_argv(host, port, max_time), timeout=max_time + 15)

    def ssh_options(self) -> List[str]:
        return [option.format(key=self.key) for option in SSH_OPTIONS]

    def ssh_command(self) -> str:
        """The ssh command line for shuttle-client's -e option."""
        return " ".join(["ssh", *self.ssh_options()])

    def ssh(
        self, login: str, command: Sequence[str], timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run command on S over ssh, from C as the test user, logging in as login."""
        # ssh hands the remote shell one string: quote the words so they arrive unchanged.
        remote = shlex.join(command)
        argv = ["ssh", *self.ssh_options(), f"{login}@{S_ADDR_C}", "--", remote]
        return self.run_as_user(argv, timeout=timeout)

    def tcptool(self, *args: str, timeout: float, ns: Optional[Namespace] = None) -> Dict[str, Any]:
        """Run a tcptool check (as the test user in C, or as root in ns); return its JSON.

        The result always has "ok"; a crash or missing JSON line is reported in "error".
        """
        check_ours(args[1])
        argv = [SYSTEM_PYTHON, str(self.tcptool_path), *args, "--timeout", str(timeout)]
        if ns is None:
            result = self.run_as_user(argv, timeout=timeout + 30)
        else:
            result = ns.run(argv, timeout=timeout + 30)
        lines = result.stdout.strip().splitlines()
        try:
            parsed: Dict[str, Any] = json.loads(lines[-1])
        except (IndexError, ValueError):
            parsed = {"ok": False, "error": f"exit {result.returncode}: {result.stderr[-2000:]}"}
        parsed["exit"] = result.returncode
        return parsed

    # --- teardown ------------------------------------------------------------------------

    def teardown(self) -> List[str]:
        """Stop everything, delete the namespaces and files; return what could not be removed.

        Each step runs in its own try, so one failure cannot skip the others.
        """
        problems: List[str] = []
        for proc in reversed(self.procs):
            try:
                proc.stop(timeout=5)
            except Exception as exc:
                problems.append(f"stopping {proc.name}: {exc!r}")
        for ns in self.namespaces:
            try:
                alive = ns.kill_all()
                if alive:
                    problems.append(f"processes left in {ns.name}: {alive}")
            except Exception as exc:
                problems.append(f"killing processes in {ns.name}: {exc!r}")
        for ns in self.namespaces:
            try:
                ns.delete()
            except Exception as exc:
                problems.append(f"deleting {ns.name}: {exc!r}")
        try:
            shutil.rmtree(self.run_dir)
        except FileNotFoundError:
            pass
        except Exception as exc:
            problems.append(f"removing {self.run_dir}: {exc!r}")
        return problems + self.leftovers()

    def leftovers(self) -> List[str]:
        """Namespaces, processes and files of this network that still exist."""
        found = [f"namespace {name}" for name in list_namespaces() if name.startswith(self.prefix)]
        needle = str(self.run_dir).encode()
        for proc_dir in Path("/proc").iterdir():
            if not proc_dir.name.isdigit() or int(proc_dir.name) == os.getpid():
                continue
            try:
                cmdline = (proc_dir / "cmdline").read_bytes()
            except OSError:
                continue
            if needle in cmdline:
                words = cmdline.replace(b"\0", b" ").decode(errors="replace")
                found.append(f"process {proc_dir.name}: {words}")
        if self.run_dir.exists():
            found.append(f"directory {self.run_dir}")
        return found

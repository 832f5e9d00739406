"""The three-namespace test network, its servers, and a teardown that leaves nothing behind.

    C (client host) 198.18.1.1 ── 198.18.1.2 S (ssh server) 198.18.2.1 ── 198.18.2.2 T (target)
                   fd00:5e:1::1 ── fd00:5e:1::2              fd00:5e:2::1 ── fd00:5e:2::2
                                                                    (and 198.18.2.3, fd00:5e:2::3)

C routes everything (both families) through S, but S does not forward: a packet from C to T
is silently dropped at S, so without shuttle the target just times out (and a UDP datagram
gets no answer). S runs a real sshd (on both of its addresses towards C); T runs an HTTP
server, a TCP echo server, a bulk server and a UDP echo server, each on every address of
both families (the UDP echo answers from the address it was sent to), and a nameserver.
S's resolv.conf names T's nameserver, and S's /etc/hosts names T; C's resolver is an
address where nothing answers (each namespace's own files, from /etc/netns/NAME).

Two unprivileged local users run things in C: the first (`topo.user`) is the one the tests
normally act as; the second (`topo.user2`) checks that a session captures only its own user's
traffic, and can run a session of its own. Each has its own directory, runtime directory and
ssh key that S accepts.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

from testbed import servers, sshd
from testbed.config import (
    C_ADDR,
    C_ADDR6,
    C_RESOLVER,
    HTTP_PORT,
    PREFIX_LEN,
    PREFIX_LEN6,
    S_ADDR6_C,
    S_ADDR6_T,
    S_ADDR_C,
    S_ADDR_T,
    S_HOSTS,
    SYSTEM_PYTHON,
    T_ADDR,
    T_ADDR2,
    T_ADDR6,
    T_ADDR6_2,
    UDP_ECHO_PORT,
    check_ours,
    url_host,
)
from testbed.netns import Namespace, list_namespaces, remove_stale
from testbed.procs import Proc, run, wait_until
from testbed.user import LocalUser, ensure_second_user, ensure_user

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


FORWARDING = (
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv6.conf.all.forwarding",
    "net.ipv6.conf.default.forwarding",
)
# What state() lists of each namespace, beside its processes and sysctls.
STATE_COMMANDS = (
    ("ip", "-o", "addr"),
    ("ip", "-4", "route", "show", "table", "all"),
    ("ip", "-6", "route", "show", "table", "all"),
    ("ip", "-4", "rule"),
    ("ip", "-6", "rule"),
    ("nft", "list", "ruleset"),  # iptables here is iptables-nft: its tables are listed too
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
    """curl of http://host:port/ (IPv6 in brackets; -g: the brackets are no glob)."""
    url = f"http://{url_host(host)}:{port}/"
    return ["curl", "-sS", "-g", "--noproxy", "*", "--max-time", str(max_time), url]


@dataclass(frozen=True)
class UserFiles:
    """A local user's place in one test network: a 0700 directory it owns (its working
    directory), a runtime directory (XDG_RUNTIME_DIR) and an ssh key that S accepts."""

    user: LocalUser
    dir: Path

    @property
    def runtime_dir(self) -> Path:
        return self.dir / "runtime"

    @property
    def key(self) -> Path:
        return self.dir / "id_ed25519"

    def create(self) -> None:
        self.dir.mkdir(mode=0o700)
        self.runtime_dir.mkdir(mode=0o700)
        run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "testbed", "-f", str(self.key)],
            timeout=30,
            check=True,
        )
        for path in (self.dir, self.runtime_dir, self.key, self.key.with_suffix(".pub")):
            os.chown(path, self.user.uid, self.user.gid)
        self.key.chmod(0o600)

    def write(self, name: str, text: str) -> Path:
        """A file in this user's directory, owned by and readable only for the user."""
        path = self.dir / name
        path.write_text(text)
        os.chown(path, self.user.uid, self.user.gid)
        path.chmod(0o600)
        return path


class Topology:
    """One test network. Use `with Topology.up() as topo:`; everything goes at the end."""

    def __init__(self, user: LocalUser, run_dir: Path, user2: Optional[LocalUser] = None):
        self.user = user
        self.user2 = user2 or ensure_second_user(user)
        self.run_dir = run_dir
        self.prefix = f"sh{os.getpid()}-{next(_counter)}"
        self.c = Namespace(self.prefix + "c")
        self.s = Namespace(self.prefix + "s")
        self.t = Namespace(self.prefix + "t")
        self.ssh_dir = run_dir / "ssh"
        self.files = {
            self.user.uid: UserFiles(self.user, run_dir / "user"),
            self.user2.uid: UserFiles(self.user2, run_dir / "user2"),
        }
        self.user_dir = self.files[self.user.uid].dir
        self.runtime_dir = self.files[self.user.uid].runtime_dir
        self.fw_dir = run_dir / "fw"
        self.www_dir = run_dir / "www"
        self.logs = run_dir / "logs"
        self.key = self.files[self.user.uid].key
        self.tcptool_path = run_dir / "tools" / "tcptool.py"
        self.marker = ""
        self.procs: List[Proc] = []
        self.sshd: Optional[Proc] = None

    @property
    def namespaces(self) -> List[Namespace]:
        return [self.c, self.s, self.t]

    @property
    def users(self) -> List[LocalUser]:
        return [self.user, self.user2]

    def home(self, user: Optional[LocalUser] = None) -> UserFiles:
        """The directory, runtime directory and key of user (default: the first user)."""
        return self.files[(user or self.user).uid]

    # --- building ------------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def up(
        cls, user: Optional[LocalUser] = None, user2: Optional[LocalUser] = None
    ) -> Iterator[Topology]:
        """Build the network, yield it, and tear it down however the block ends."""
        remove_stale()
        remove_stale_dirs()
        run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-"))
        run_dir.chmod(0o755)  # the test users must reach their keys, the tools and the socket
        try:
            topo = cls(user or ensure_user(), run_dir, user2)
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
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
        for files in self.files.values():
            files.create()
        self._make_network()
        authorized = self.ssh_dir / "authorized_keys"
        authorized.write_text(
            "".join(files.key.with_suffix(".pub").read_text() for files in self.files.values())
        )
        authorized.chmod(0o644)  # sshd reads it with the logging-in user's rights
        self.start_sshd()
        self.marker = servers.write_page(self.www_dir)
        servers.install_tcptool(self.tcptool_path.parent)
        self.procs.extend(servers.start(self.t, self.www_dir, self.tcptool_path, self.logs))

    def start_sshd(self, tcp_forwarding: bool = True) -> None:
        """sshd in S, a new one if it runs (tcp_forwarding False: AllowTcpForwarding no)."""
        if self.sshd is not None:
            self.sshd.stop()
            self.procs.remove(self.sshd)
        logins = [user.name for user in self.users] + ["root"]
        authorized = self.ssh_dir / "authorized_keys"
        config = sshd.write_config(self.ssh_dir, authorized, logins, tcp_forwarding)
        self.sshd = sshd.start(self.s, config, self.logs / "sshd.log")
        self.procs.append(self.sshd)

    def _make_network(self) -> None:
        for ns in self.namespaces:
            ns.create()
        self.c.write_etc("resolv.conf", f"nameserver {C_RESOLVER}\n")
        self.s.write_etc("resolv.conf", f"nameserver {T_ADDR}\n")
        self.s.write_etc(
            "hosts",
            "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"
            + "".join(f"{address} {name}\n" for name, address in S_HOSTS),
        )
        # The veth pairs are created inside the namespaces: their names never meet the host's.
        self.c.ip(
            "link", "add", "to-s", "type", "veth", "peer", "name", "to-c", "netns", self.s.name
        )
        self.s.ip(
            "link", "add", "to-t", "type", "veth", "peer", "name", "to-s", "netns", self.t.name
        )
        links = (
            (self.c, "to-s", C_ADDR, C_ADDR6),
            (self.s, "to-c", S_ADDR_C, S_ADDR6_C),
            (self.s, "to-t", S_ADDR_T, S_ADDR6_T),
            (self.t, "to-s", T_ADDR, T_ADDR6),
            (self.t, "to-s", T_ADDR2, T_ADDR6_2),
        )
        for ns, dev, addr, addr6 in links:
            ns.ip("addr", "add", f"{addr}/{PREFIX_LEN}", "dev", dev)
            # nodad: no duplicate address detection, so the address is usable at once; no DAD
            # on the link either, so its link-local address (neighbour discovery's) is too.
            ns.ip("-6", "addr", "add", f"{addr6}/{PREFIX_LEN6}", "dev", dev, "nodad")
            ns.sysctl(f"net.ipv6.conf.{dev}.accept_dad", "0")
            ns.ip("link", "set", dev, "up")
        # Complete when a test gets it: every link with its link-local address, which the
        # kernel adds on its own once both ends are up (so two looks at it see the same).
        if not wait_until(
            lambda: all(ns.has_link_local(dev) for ns, dev, _, _ in links), 10, interval=0.05
        ):
            raise RuntimeError("the test network's links got no link-local address in 10 s")
        self.c.ip("route", "add", "default", "via", S_ADDR_C)
        self.t.ip("route", "add", "default", "via", S_ADDR_T)
        self.c.ip("-6", "route", "add", "default", "via", S_ADDR6_C)
        self.t.ip("-6", "route", "add", "default", "via", S_ADDR6_T)
        # The point of the topology: S must not route C's packets to T, in either family.
        for key in FORWARDING:
            self.s.sysctl(key, "0")

    # --- running things ------------------------------------------------------------------

    def user_env(
        self, path: Sequence[str] = (), user: Optional[LocalUser] = None
    ) -> Dict[str, str]:
        return {
            "PATH": ":".join([*path, "/usr/bin", "/bin"]),
            "XDG_RUNTIME_DIR": str(self.home(user).runtime_dir),
        }

    def user_argv(
        self,
        argv: Sequence[str],
        env: Optional[Mapping[str, str]] = None,
        user: Optional[LocalUser] = None,
    ) -> List[str]:
        """argv run in C as user (default: the first test user)."""
        user = user or self.user
        return self.c.argv(user.argv(argv, env if env is not None else self.user_env(user=user)))

    def run_as_user(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 30,
        check: bool = False,
        user: Optional[LocalUser] = None,
    ) -> subprocess.CompletedProcess[str]:
        return run(
            self.user_argv(argv, user=user), timeout=timeout, check=check, cwd=self.home(user).dir
        )

    def start(self, name: str, argv: Sequence[str], user: Optional[LocalUser] = None) -> Proc:
        """Start a long-running process (argv already complete); it is stopped at teardown."""
        proc = Proc(name, argv, self.logs / f"{name}.log", cwd=self.home(user).dir)
        self.procs.append(proc)
        return proc

    def curl(
        self,
        host: str = T_ADDR,
        port: int = HTTP_PORT,
        max_time: float = 2,
        user: Optional[LocalUser] = None,
    ) -> subprocess.CompletedProcess[str]:
        """curl http://host:port/ in C as user (default: the first test user)."""
        return self.run_as_user(curl_argv(host, port, max_time), timeout=max_time + 15, user=user)

    def ssh_options(self, user: Optional[LocalUser] = None) -> List[str]:
        return [option.format(key=self.home(user).key) for option in SSH_OPTIONS]

    def ssh_command(self, user: Optional[LocalUser] = None) -> str:
        """The ssh command line for shuttle-client's -e option, with user's key."""
        return " ".join(["ssh", *self.ssh_options(user)])

    def ssh(
        self,
        login: str,
        command: Sequence[str],
        timeout: float = 30,
        user: Optional[LocalUser] = None,
        host: str = S_ADDR_C,
    ) -> subprocess.CompletedProcess[str]:
        """Run command on S over ssh (to host), from C as user, logging in as login."""
        # ssh hands the remote shell one string: quote the words so they arrive unchanged.
        remote = shlex.join(command)
        argv = ["ssh", *self.ssh_options(user), f"{login}@{check_ours(host)}", "--", remote]
        return self.run_as_user(argv, timeout=timeout, user=user)

    def processes_of(self, ns: Namespace, user: LocalUser, comm_prefix: str) -> List[int]:
        """The processes in ns that user runs whose name starts with comm_prefix: on S,
        "sshd" finds the sshd processes that serve user's sessions (privilege separation runs
        them as the user), "python" the agents."""
        found = []
        for pid in ns.pids():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                owner = Path(f"/proc/{pid}").stat().st_uid
            except OSError:
                continue  # gone meanwhile
            if comm.startswith(comm_prefix) and owner == user.uid:
                found.append(pid)
        return found

    def write_user_file(self, name: str, text: str, user: Optional[LocalUser] = None) -> Path:
        """A file only user can read, in its directory (for -s FILE / -X FILE, say)."""
        return self.home(user).write(name, text)

    def tcptool(
        self,
        *args: str,
        timeout: float,
        ns: Optional[Namespace] = None,
        user: Optional[LocalUser] = None,
    ) -> Dict[str, Any]:
        """Run a tcptool check (as user in C, default the first test user, or as root in ns);
        return its JSON.

        The result always has "ok"; a crash or missing JSON line is reported in "error".
        """
        check_ours(args[1])
        argv = [SYSTEM_PYTHON, str(self.tcptool_path), *args, "--timeout", str(timeout)]
        if ns is None:
            result = self.run_as_user(argv, timeout=timeout + 30, user=user)
        else:
            result = ns.run(argv, timeout=timeout + 30)
        lines = result.stdout.strip().splitlines()
        try:
            parsed: Dict[str, Any] = json.loads(lines[-1])
        except (IndexError, ValueError):
            parsed = {"ok": False, "error": f"exit {result.returncode}: {result.stderr[-2000:]}"}
        parsed["exit"] = result.returncode
        return parsed

    def udp_echo(
        self,
        host: str,
        port: int = UDP_ECHO_PORT,
        *,
        count: int = 20,
        big: int = 8000,
        tries: int = 3,
        wait: float = 2,
        ns: Optional[Namespace] = None,
        user: Optional[LocalUser] = None,
    ) -> Dict[str, Any]:
        """tcptool's UDP echo check to host:port (as user in C, or as root in ns): count
        datagrams (sizes up to 1400 bytes, and one of big bytes), each sent up to tries times
        and waited for wait seconds; each echo must come from host:port. Its JSON result."""
        args = ["--count", str(count), "--big", str(big), "--tries", str(tries)]
        return self.tcptool(
            "udp",
            host,
            str(port),
            *args,
            "--wait",
            str(wait),
            timeout=count * tries * wait + 10,
            ns=ns,
            user=user,
        )

    def udp_silent(
        self,
        host: str,
        port: int = UDP_ECHO_PORT,
        *,
        wait: float = 2,
        ns: Optional[Namespace] = None,
        user: Optional[LocalUser] = None,
    ) -> Dict[str, Any]:
        """tcptool's check that datagrams to host:port get no answer within wait seconds (as
        user in C, or as root in ns): not captured, as without shuttle. Its JSON result."""
        return self.tcptool(
            "udp-silent", host, str(port), "--wait", str(wait), timeout=wait, ns=ns, user=user
        )

    def state(self) -> Dict[str, str]:
        """What of this network a test could change and a later test would see, as text: each
        namespace's processes, addresses, routes, policy rules, firewall, forwarding and own
        /etc files, and the files in the users' directories. The same state as right after
        build() means a test left the network as it found it."""
        found: Dict[str, str] = {}
        for ns in self.namespaces:
            found[f"{ns.name} pids"] = " ".join(map(str, sorted(ns.pids())))
            for argv in (*STATE_COMMANDS, ("sysctl", *FORWARDING)):
                found[f"{ns.name} {' '.join(argv)}"] = ns.run(argv, timeout=15, check=True).stdout
            for path in sorted(ns.etc.glob("*")):  # T has no such directory
                found[f"{ns.name} {path}"] = path.read_text()
        for files in self.files.values():
            paths = sorted(str(path) for path in files.dir.rglob("*"))
            found[f"files of {files.user.name}"] = "\n".join(paths)
        return found

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
        found += [f"directory {ns.etc}" for ns in self.namespaces if ns.etc.exists()]
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

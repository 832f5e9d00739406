"""The shuttle-firewalld command: options, start-up checks, logging, signals, the service
manager's reports, clean exit; and `ctl`, which asks a running firewalld."""

from __future__ import annotations

import grp
import importlib.metadata
import logging
import math
import os
import resource
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

from docopt import DocoptExit, docopt
from shuttle_local.notify import Notifier

from .connections import MAX_CONNECTIONS
from .ctl import sessions_command
from .errors import RequestError, StartupError
from .handover import MAX_TOKENS
from .hosts_file import DEFAULT_PATH as HOSTS_PATH
from .hosts_file import HostsFile
from .methods.base import Method
from .methods.nat import NatMethod
from .methods.nft import NftMethod
from .methods.tproxy import TproxyMethod
from .policy import DEFAULT_PATH, load_policy
from .server import FDS_SUFFIX, Server
from .sessions import Sessions

USAGE = """\
shuttle-firewalld: shuttle's root daemon; applies firewall rules for shuttle clients.

Usage:
  shuttle-firewalld [--socket=PATH] [--group=GROUP] [--lease=SECONDS] [--policy=PATH]
                    [--hosts-file=PATH] [-v]
  shuttle-firewalld ctl sessions [--socket=PATH] [--json]
  shuttle-firewalld -h | --help
  shuttle-firewalld --version

Options:
  --socket=PATH      listen on this zmq ipc socket, and on PATH.fds for handing
                     tproxy sockets over [default: /run/shuttle/firewalld.sock]
  --group=GROUP      members of this group may connect [default: shuttle]
  --lease=SECONDS    a session without heartbeat for this long is removed [default: 6]
  --policy=PATH      who may capture others' or forwarded traffic, or set host names;
                     a missing file allows that to root only
                     [default: /etc/shuttle/firewalld.policy]
  --hosts-file=PATH  where sessions' host names go, each session's in its own
                     marked block [default: /etc/hosts]
  -v, --verbose      log debug messages too
  --json             ctl: print JSON, for scripts, instead of a table
  -h, --help         show this help
  --version          show the version

ctl sessions lists the sessions of a running shuttle-firewalld that the caller may
see: its own, and every session for root.
"""

MIN_LEASE, MAX_LEASE = 1.0, 3600.0
# sun_path holds 108 bytes, the last one a NUL; the fd socket's path is longer by a suffix.
MAX_SOCKET_PATH = 107 - len(FDS_SUFFIX)

log = logging.getLogger("shuttle_firewalld")
# A report the service manager missed is worth a line: the unit waits for READY=1.
notify = Notifier(log, logging.WARNING)


class UsageError(Exception):
    """The command line is wrong; str() says how, in one line."""


@dataclass(frozen=True)
class CtlOptions:
    """`ctl sessions`: ask the firewalld on this socket for the sessions we may see."""

    socket: str
    json: bool


@dataclass(frozen=True)
class Options:
    socket: str
    group: str
    lease: float
    verbose: bool
    policy: str = DEFAULT_PATH
    hosts_file: str = HOSTS_PATH


def parse_args(argv: Sequence[str]) -> Options | CtlOptions:
    """Options from the command line, every value checked; UsageError if one is bad."""
    try:
        args = docopt(USAGE, list(argv), version=importlib.metadata.version("shuttle-firewalld"))
    except DocoptExit as exc:
        # docopt's own text is the whole usage, or a "Warning: ..." with its internals.
        first = str(exc).splitlines()[0] if str(exc) else ""
        words = list(argv)
        if words[:1] == ["ctl"] and words[1:2] != ["sessions"]:
            command = f"unknown ctl command {words[1]!r}" if words[1:] else "ctl needs a command"
            first = f"{command} (known: sessions)"
        elif not first or first.startswith(("Warning", "Usage")):
            first = "unexpected arguments: " + " ".join(argv)
        raise UsageError(f"{first} (see shuttle-firewalld --help)") from None
    path = args["--socket"]
    if not os.path.isabs(path) or len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UsageError(f"--socket must be an absolute path of at most {MAX_SOCKET_PATH} bytes")
    if args["ctl"]:
        return CtlOptions(socket=path, json=args["--json"])
    try:
        lease = float(args["--lease"])
    except ValueError:
        lease = math.nan
    if not MIN_LEASE <= lease <= MAX_LEASE:  # also false for nan
        raise UsageError(
            f"--lease must be a number of seconds in [{MIN_LEASE:g}, {MAX_LEASE:g}], "
            f"got {args['--lease']!r}"
        )
    if not os.path.isabs(args["--policy"]):
        raise UsageError("--policy must be an absolute path")
    if not os.path.isabs(args["--hosts-file"]):
        raise UsageError("--hosts-file must be an absolute path")
    return Options(
        socket=path,
        group=args["--group"],
        lease=lease,
        verbose=args["--verbose"],
        policy=args["--policy"],
        hosts_file=args["--hosts-file"],
    )


def group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise StartupError(
            f"group {name!r} does not exist: create it (groupadd {name}) and add the users "
            "who may use shuttle, or pass --group"
        ) from None


class Stop:
    """Set by SIGTERM or SIGINT; the loop looks at it at least every poll interval."""

    def __init__(self) -> None:
        self.requested = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handler)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def raise_file_limit() -> int:
    """Allow as many open files as the hard limit does: tproxy sessions hold sockets here
    (reply sockets until they are fetched), and the soft limit is often only 1024. The
    limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open file limit from %d: %s", soft, exc)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return sys.maxsize if soft == resource.RLIM_INFINITY else soft


def descriptor_budget(limit: int) -> tuple[int, int]:
    """(zmq connections, reply-socket tokens) allowed in all under this open file limit: a
    sixteenth and an eighth of it at most, so that with the fd socket's waiting connections,
    the tproxy sessions' listeners and the tools' pipes firewalld stays well below it
    (libzmq aborts when it meets the limit; the server stops listening at three quarters)."""
    return min(MAX_CONNECTIONS, limit // 16), min(MAX_TOKENS, limit // 8)


def plural(count: int) -> str:
    return f"{count} session" + ("" if count == 1 else "s")


def status_line(path: str, count: int) -> str:
    """What the service manager shows for us (systemctl status): where, and how busy."""
    return f"listening on ipc://{path}; {plural(count)} open"


def report(path: str, count: int, stop: Stop) -> None:
    """Tell the service manager the number of sessions now (not while stopping: each close
    at exit would say the daemon listens)."""
    if not stop.requested:
        notify(status=status_line(path, count))


def run(options: Options) -> int:
    """Start, serve until a signal, and undo everything; the exit status."""
    if os.geteuid() != 0:
        raise StartupError("must run as root: it changes firewall rules")
    gid = group_id(options.group)
    scope_policy = load_policy(options.policy)
    stop = Stop()
    file_limit = raise_file_limit()
    max_connections, max_tokens = descriptor_budget(file_limit)
    nft = NftMethod()
    tproxy = TproxyMethod()
    methods: dict[str, Method] = {"nft": nft, "nat": NatMethod(), "tproxy": tproxy}
    hosts = HostsFile(options.hosts_file)
    sessions = Sessions(
        methods,
        options.lease,
        policy=scope_policy,
        fd_path=options.socket + FDS_SUFFIX,
        fence=tproxy,
        hosts=hosts,
        on_change=lambda count: report(options.socket, count, stop),
    )
    sessions.grants.max_tokens = max_tokens
    try:
        # First, since it refuses to start beside a running firewalld, whose rules are live.
        server = Server(options.socket, gid, sessions, max_connections, file_limit)
    except OSError as exc:
        raise StartupError(f"cannot listen on {options.socket}: {exc}") from None
    status = 0
    try:
        # Before the first request is read: requests wait in the socket's queue meanwhile.
        for name, method in methods.items():
            try:
                method.remove_stale()
            except Exception as exc:  # a missing tool must not stop the other methods
                log.warning("%s: cannot check for stale rules: %s", name, exc)
        try:
            hosts.remove_stale()
        except RequestError as exc:  # sessions may still work; setting host names may fail
            log.warning("cannot check for stale host blocks: %s", exc)
        # Once, after the stale rules are gone (a crashed run may have left the probe's
        # table): whether this kernel and nft can do what an nft (tproxy) session needs.
        for name, probe in (("nft", nft.probe), ("tproxy", tproxy.probe)):
            problem = probe()
            if problem is not None:
                sessions.disable(name, problem)
                log.warning("the %s method does not work here: %s", name, problem)
        log.info("method auto means %s", sessions.choose("auto"))
        log.info(
            "listening on ipc://%s (group %s, lease %g s; at most %d connections, %d tokens)",
            options.socket,
            options.group,
            options.lease,
            max_connections,
            max_tokens,
        )
        notify(ready="1", status=status_line(options.socket, len(sessions)))
        server.run(stopping=lambda: stop.requested)
    except Exception:
        log.exception("the loop failed")
        status = 1
    finally:
        stop.requested = True  # also after a failed loop: no more "listening" reports
        notify(stopping="1", status=f"stopping: removing {plural(len(sessions))}")
        # Each undo step on its own, so one failure cannot skip the others.
        try:
            sessions.close_all("closed at exit")
        finally:
            server.close()
    log.info("stopped")
    return status


def main(argv: Sequence[str] | None = None) -> None:
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"shuttle-firewalld: {exc}", file=sys.stderr)
        sys.exit(2)
    if isinstance(options, CtlOptions):  # a client of the daemon: no root, no logging set-up
        sys.exit(sessions_command(options.socket, options.json, sys.stdout, sys.stderr))
    logging.basicConfig(
        format="shuttle-firewalld: %(message)s",
        level=logging.DEBUG if options.verbose else logging.INFO,
        stream=sys.stderr,
    )
    try:
        sys.exit(run(options))
    except StartupError as exc:
        log.error("%s", exc)
        sys.exit(1)

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

from docopt import DocoptExit, docopt
from shuttle_local.notify import Notifier
from shuttle_local.oneshot import LISTENING, socket_path
from shuttle_protocol.zap import Peer, anyone

from . import oneshot
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
  shuttle-firewalld --one-shot [-v]
  shuttle-firewalld --sudoers [WHO]
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
  --one-shot         serve one caller only, as shuttle-client starts it through sudo:
                     the uid in SUDO_UID (root's without sudo), on a socket of its
                     own under /run/shuttle-oneshot, named on stdout; exit when that
                     caller's session ends, its stdin closes or its lease runs out
  --sudoers          print the sudoers line that lets WHO (a user, or %GROUP; default:
                     the user who ran sudo) start the one-shot mode without a password
  -v, --verbose      log debug messages too (one-shot: also what the daemon logs as info)
  --json             ctl: print JSON, for scripts, instead of a table
  -h, --help         show this help
  --version          show the version

Without --one-shot, the socket's group decides who may connect. A one-shot firewalld
does not remove rules left by an earlier run (they may be another firewalld's, alive).

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
class SudoersOptions:
    """`--sudoers`: print the sudoers line for who (None: the user who ran sudo)."""

    who: str | None


@dataclass(frozen=True)
class Options:
    socket: str
    group: str
    lease: float
    verbose: bool
    policy: str = DEFAULT_PATH
    hosts_file: str = HOSTS_PATH
    one_shot: bool = False


def parse_args(argv: Sequence[str]) -> Options | CtlOptions | SudoersOptions:
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
    if args["--sudoers"]:
        return SudoersOptions(who=args["WHO"])
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
        one_shot=args["--one-shot"],
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
    """Set by SIGTERM or SIGINT; the loop looks at it at least every poll interval.

    one_shot (a one-shot firewalld that follows its client's pipe): SIGINT is ignored. A
    Ctrl-C on the client's terminal reaches us too (sudo relays it), and the client, which
    then closes its session, is what we follow."""

    def __init__(self, one_shot: bool = False) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, signal.SIG_IGN if one_shot else self._handler)

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


@dataclass(frozen=True)
class Listening:
    """Where firewalld listens and who may connect: the socket file's owner and group, and
    the ZAP handler's word on each caller."""

    path: str
    owner: int
    gid: int
    admit: Callable[[Peer], str | None] = anyone


def listening(options: Options) -> Listening:
    """The service's socket, for the group's members; or a one-shot's, for its caller."""
    if not options.one_shot:
        return Listening(options.socket, 0, group_id(options.group))
    uid = oneshot.caller_uid(os.environ)
    oneshot.prepare_directory()
    # The socket file is the caller's, group root, mode 0660: nobody else may connect.
    return Listening(socket_path(os.getpid()), uid, 0, oneshot.admit_only(uid))


def run(options: Options) -> int:
    """Start, serve until a signal (one-shot: until the caller is done), and undo
    everything; the exit status."""
    if os.geteuid() != 0:
        raise StartupError("must run as root: it changes firewall rules")
    where = listening(options)
    scope_policy = load_policy(options.policy)
    caller = oneshot.Caller() if options.one_shot else None
    stop = Stop(one_shot=caller is not None and caller.follows_pipe)
    file_limit = raise_file_limit()
    max_connections, max_tokens = descriptor_budget(file_limit)
    nft = NftMethod()
    tproxy = TproxyMethod()
    methods: dict[str, Method] = {"nft": nft, "nat": NatMethod(), "tproxy": tproxy}
    hosts = HostsFile(options.hosts_file)

    def changed(count: int) -> None:
        if caller is not None:
            caller.sessions(count)
        report(where.path, count, stop)

    sessions = Sessions(
        methods,
        options.lease,
        policy=scope_policy,
        fd_path=where.path + FDS_SUFFIX,
        fence=tproxy,
        hosts=hosts,
        on_change=changed,
    )
    sessions.grants.max_tokens = max_tokens
    try:
        # First, since it refuses to start beside a running firewalld, whose rules are live.
        server = Server(
            where.path,
            where.gid,
            sessions,
            max_connections,
            file_limit,
            owner=where.owner,
            admit=where.admit,
        )
    except OSError as exc:
        raise StartupError(f"cannot listen on {where.path}: {exc}") from None
    status = 0
    try:
        probes = {"nft": nft.probe, "tproxy": tproxy.probe}
        prepare_methods(sessions, methods, hosts, probes, options.one_shot)
        log.info("method auto means %s", sessions.choose("auto"))
        log.info(
            "listening on ipc://%s (%s, lease %g s; at most %d connections, %d tokens)",
            where.path,
            f"uid {where.owner} only" if options.one_shot else f"group {options.group}",
            options.lease,
            max_connections,
            max_tokens,
        )
        notify(ready="1", status=status_line(where.path, len(sessions)))
        if options.one_shot:  # the client waits for this line, and learns the path from it
            print(LISTENING + where.path, flush=True)
        server.run(stopping=lambda: stop.requested or (caller is not None and caller.finished()))
        if caller is not None and caller.why is not None:
            log.info("stopping: %s", caller.why)
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


def prepare_methods(
    sessions: Sessions,
    methods: dict[str, Method],
    hosts: HostsFile,
    probes: dict[str, Callable[[], str | None]],
    one_shot: bool,
) -> None:
    """Before the first request: remove what a crashed run left (not in one-shot mode:
    another firewalld's rules look as stale as a crashed run's, and are alive); then, once,
    whether this kernel and nft can do what an nft (tproxy) session needs."""
    if one_shot:
        # tproxy's fwmark slots are counted per firewalld, and would meet another's.
        sessions.disable("tproxy", "a one-shot firewalld offers nft and nat only")
        probes = {name: probe for name, probe in probes.items() if name != "tproxy"}
    else:
        remove_stale(methods, hosts)
    for name, probe in probes.items():
        problem = probe()
        if problem is not None:
            sessions.disable(name, problem)
            log.warning("the %s method does not work here: %s", name, problem)


def remove_stale(methods: dict[str, Method], hosts: HostsFile) -> None:
    """Remove what a crashed earlier run left; before the first request is read (requests
    wait in the socket's queue meanwhile)."""
    for name, method in methods.items():
        try:
            method.remove_stale()
        except Exception as exc:  # a missing tool must not stop the other methods
            log.warning("%s: cannot check for stale rules: %s", name, exc)
    try:
        hosts.remove_stale()
    except RequestError as exc:  # sessions may still work; setting host names may fail
        log.warning("cannot check for stale host blocks: %s", exc)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"shuttle-firewalld: {exc}", file=sys.stderr)
        sys.exit(2)
    if isinstance(options, CtlOptions):  # a client of the daemon: no root, no logging set-up
        sys.exit(sessions_command(options.socket, options.json, sys.stdout, sys.stderr))
    if isinstance(options, SudoersOptions):
        try:
            print(oneshot.sudoers_line(options.who, os.environ), end="")
        except StartupError as exc:
            print(f"shuttle-firewalld: {exc}", file=sys.stderr)
            sys.exit(1)
        sys.exit(0)
    # One-shot: its lines go to the client's terminal, amid the client's; the quiet ones
    # only when asked for.
    quiet = logging.WARNING if options.one_shot else logging.INFO
    logging.basicConfig(
        format="shuttle-firewalld: %(message)s",
        level=logging.DEBUG if options.verbose else quiet,
        stream=sys.stderr,
    )
    try:
        sys.exit(run(options))
    except StartupError as exc:
        log.error("%s", exc)
        sys.exit(1)

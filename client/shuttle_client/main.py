"""shuttle-client's entry point: set up the tunnel, the firewall session and the listener,
then relay until a signal ends it (or, with --no-reconnect, a lost tunnel or firewall
session). A firewall session lost to a firewalld restart is opened again, the same."""

import asyncio
import functools
import logging
import os
import signal
import socket
import sys
from typing import Any, Awaitable, Callable, List, NoReturn, Optional, Sequence, Tuple, TypeVar

from shuttle_ends.limits import raise_open_files
from shuttle_local.netns import enter_named
from shuttle_protocol.control_messages import (
    MAX_REASON,
    Connected,
    Disconnected,
    FirewallBack,
    FirewallLost,
)
from shuttle_protocol.firewall_messages import SHORTCUT_METHODS
from shuttle_protocol.schema import Message

from . import logs
from .argfiles import named_namespace, parse_command_line
from .capture import Capture
from .cli import DocoptExit, Options, UsageError
from .control import ControlInUse, ControlServer, ControlSetupError
from .control_paths import default_control_path
from .control_requests import Running, handler
from .daemon import PidFile, PidFileError, daemonize
from .discovery import DiscoveryError
from .dns import make_udp_sockets
from .firewall_session import FirewallError, FirewallSession, FirewallUnavailable
from .hosts_sync import HostsSync
from .plan import Plan, PlanError, make_plan
from .private_firewalld import PrivateFirewalld, has_terminal, nobody_answers
from .proxies.server import Proxies, ProxyError
from .proxy import make_listeners
from .readiness import Readiness
from .shortcuts import Entry, Shortcuts, shortcut_limit
from .ssh_server import Server, find_server
from .streams import Streams
from .targets import describe
from .tunnel import TunnelError

log = logging.getLogger("shuttle")

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
REOPEN_FIRST = 0.5  # seconds before the first attempt to open a lost firewall session again
REOPEN_MAX = 4.0  # the delay doubles after each failed attempt, up to this


class Stopped(Exception):
    """A signal asked us to stop."""


async def run(options: Options, readiness: Optional[Readiness] = None) -> int:
    """Run one tunnel until told to stop; the exit status. readiness hears of ready and stopping."""
    readiness = readiness or Readiness()
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[str] = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _set_once, stop, signal.Signals(signum).name)
    log.debug("open-file limit %d", raise_open_files())
    bound = _listen(options)
    if bound is None:
        return EXIT_FAILED
    listeners, proxies = bound
    streams = Streams(options)
    firewall = FirewallSession(options.firewalld)
    client = Running(options, streams, firewall, lambda why: _set_once(stop, why))
    capture = Capture(
        streams, firewall, listeners, options.wait_tunnel, client.captures, take=streams.take
    )
    control = ControlServer(options.control or default_control_path(), handler(client))
    keeper: Optional[asyncio.Task[None]] = None
    private: Optional[PrivateFirewalld] = None
    streams.publish = _publisher(control, streams, readiness)
    try:
        await _start_control(control, chosen=options.control is not None)
        private = await _unless_stopped(stop, _private_firewalld(options, firewall))
        await _bring_up(client, capture, stop, proxies)
        keeper = _ready(client, capture, readiness, private is not None)
        waiting: List[asyncio.Future[Any]] = [stop, streams.lost, *filter(None, [keeper])]
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if stop in done:
            log.info("stopping on %s", stop.result())
            return EXIT_OK
        if streams.lost in done:
            log.error("lost the tunnel: %s (and --no-reconnect)", streams.lost.result())
        elif keeper is not None:
            keeper.result()  # raises the FirewallError that ended it
        return EXIT_FAILED
    except Stopped:
        log.info("stopping on %s", stop.result())
        return EXIT_OK
    except (TunnelError, FirewallError, DiscoveryError, PlanError, ControlSetupError) as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    finally:
        client.stopping = True
        readiness.stopping()
        if keeper is not None:  # a heartbeat waiting on firewalld must not delay the close
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        await _close(capture, proxies, streams, firewall, private)
        control.close()
        await _cancel_the_rest()


async def _close(
    capture: Capture,
    proxies: Proxies,
    streams: Streams,
    firewall: FirewallSession,
    private: Optional[PrivateFirewalld],
) -> None:
    # Listeners first: a new connection meets a closed port (a reset), not the direct
    # path. Then the connections in flight are reset while the rules still stand: once
    # they are gone, the NAT that would carry each reset back to its program is too.
    capture.close()
    proxies.close()
    await streams.stop()
    await firewall.close()
    if streams.shortcuts is not None:  # their rules went with the session
        streams.shortcuts.close()
    if private is not None:  # after the session's close: it then exits at once
        await private.stop()


async def _private_firewalld(
    options: Options, firewall: FirewallSession
) -> Optional[PrivateFirewalld]:
    """A private firewalld, started for us if none was named and none answers at the
    default socket; first, as sshuttle does, so that sudo's prompt comes before ssh's."""
    if not options.captures or options.firewalld_named or not nobody_answers(options.firewalld):
        return None
    private = await PrivateFirewalld.start(interactive=not options.daemon and has_terminal())
    firewall.move(private.path)
    return private


def _ready(
    client: Running, capture: Capture, readiness: Readiness, private: bool
) -> "Optional[asyncio.Task[None]]":
    """Say ready; the task that keeps the firewall session, if there is one (private: a
    firewalld of our own)."""
    client.ready = True
    destination = client.options.ssh_destination
    if not client.options.captures:
        readiness.ready(f"proxies through {destination}")
        return None
    readiness.ready(f"capturing through {destination} (method {client.method})")
    return asyncio.get_running_loop().create_task(_keep_firewall(client, capture, private))


def _listen(options: Options) -> Optional[Tuple[List[socket.socket], Proxies]]:
    """The redirect listeners (none with tproxy, or with nothing captured) and the proxies'
    listeners; None, once the reason is logged, if one cannot bind."""
    try:
        capturing = options.captures and options.method != "tproxy"
        listeners = make_listeners(options.listen) if capturing else []
    except OSError as exc:
        where = ", ".join(f"{host}:{port}" for host, port in options.listen)
        log.error("cannot listen on %s: %s", where, exc.strerror)
        return None
    try:
        return listeners, Proxies(options)
    except ProxyError as exc:
        for sock in listeners:
            sock.close()
        log.error("%s", exc)
        return None


async def _bring_up(
    client: Running,
    capture: Capture,
    stop: "asyncio.Future[str]",
    proxies: Proxies,
) -> None:
    """Tunnel, plan, firewall session, capture, proxies: everything up to the ready line.
    With only proxies, firewalld is never asked."""
    options, streams, firewall = client.options, client.streams, client.firewall
    if not options.captures:  # nor the server's address: only a capture needs to exclude it
        await _unless_stopped(stop, streams.start())
        proxies.start(streams)
        log.info(
            "ready: %s through %s (no capture, TCP through %s)",
            proxies.describe(),
            options.ssh_destination,
            streams.tcp_path,
        )
        return
    logs.stage("control socket")
    starting = asyncio.ensure_future(streams.start())
    try:
        server, plan, port = await _capture_while_starting(client, capture, stop, starting)
        await _unless_stopped(stop, starting)
    finally:
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
    logs.stage("tunnel up")
    proxies.start(streams)
    if proxies.listeners:
        log.info("proxies: %s", proxies.describe())
    if options.auto_hosts:
        names = (options.ssh_destination.rpartition("@")[2], server.hostname)
        client.hosts = _watch_hosts(streams, options, HostsSync(firewall, names))
    log.info(
        "ready: capturing %s%s%s through %s (method %s, agent on python %s, port %d%s, TCP %s)",
        " ".join(describe(target) for target in plan.subnets),
        "".join(f" -{describe(target)}" for target in options.excludes),
        f" and DNS to {' '.join(plan.dns)}" if plan.dns else "",
        options.ssh_destination,
        client.method,
        streams.agent_python,
        port,
        f", {options.streams} streams" if options.streams > 1 else "",
        f"through {streams.tcp_path}",
    )


async def _capture_while_starting(
    client: Running,
    capture: Capture,
    stop: "asyncio.Future[str]",
    starting: "asyncio.Task[None]",
) -> Tuple[Server, Plan, int]:
    """The server's addresses, the plan, the firewall session and the capture, while the
    streams start (the task starting): ssh -G runs beside ssh; the rules wait for ssh's
    own connection to be up unless the excludes are known to cover it (else they could
    capture it), and, where the plan or the capture needs them, for the agents (-N: their
    routes; --dns: their nameservers, and queries relayed at once; tproxy: whether they
    relay UDP). Connections captured before the agents greet go through a master, or wait
    (proxy.Waiting) as during a reconnect."""
    options = client.options
    server = await _unless_stopped(
        stop, find_server(options.ssh_cmd, options.ssh_destination, options.ssh_port)
    )
    logs.stage("ssh -G")
    if not server.covered:
        await _unless_stopped(stop, _ssh_connected(client.streams, starting))
        logs.stage("ssh connected")
    if options.auto_nets or options.dns:
        await _unless_stopped(stop, starting)
    plan = await _unless_stopped(stop, make_plan(options, client.streams.tunnels[0].discovery))
    if plan.nameserver is not None:
        capture.add_dns(plan.nameserver, dns_sockets(capture.listeners))
        client.streams.reconnect_ssh = server.pinned()
    client.subnets, client.excludes = plan.subnets, options.excludes
    client.fixed_excludes, client.dns = server.excludes, plan.dns
    client.method = await _unless_stopped(stop, _open_firewall(client, capture, options.method))
    logs.stage("firewall session open, rules applied")
    _start_shortcuts(client)
    if client.method == "tproxy":
        await _unless_stopped(stop, starting)
    agents = client.streams.agent_capabilities
    port = await _unless_stopped(stop, capture.start(client.method, agents))
    return server, plan, port


def _start_shortcuts(client: Running) -> None:
    """Hot destinations straight into ssh's own forwards, where TCP may take ssh's path and
    the method redirects into a loopback port (tproxy reaches transparent sockets only)."""
    streams = client.streams
    limit = shortcut_limit(client.options.tcp_cap)
    wanted = streams.fast and client.options.shortcuts and client.method in SHORTCUT_METHODS
    if not wanted or limit < 1:
        return

    def apply(entries: Tuple[Entry, ...]) -> Awaitable[int]:
        return client.firewall.set_shortcuts(entries, limit)

    streams.shortcuts = Shortcuts(apply, client.captures)


async def _ssh_connected(streams: Streams, starting: "asyncio.Task[None]") -> None:
    """Until every stream's ssh is connected; the start's error if it fails first."""
    connected = asyncio.ensure_future(streams.connected())
    try:
        await asyncio.wait([connected, starting], return_when=asyncio.FIRST_COMPLETED)
    finally:
        connected.cancel()
    if starting.done():
        starting.result()


async def _open_firewall(client: Running, capture: Capture, method: str) -> str:
    """Open the firewall session for what the client captures now; the method applied."""
    options = client.options
    return await client.firewall.open(
        method,
        capture.rules_port(),
        client.subnets,
        client.all_excludes,
        options.uid,
        options.gid,
        options.forward,
        dns=client.dns,
    )


async def _keep_firewall(client: Running, capture: Capture, private: bool = False) -> None:
    """Keep the firewall session for as long as the client runs. A lost one (firewalld
    stopped, crashed or restarted) is opened again with the same method and what the
    client captures now, backing off while firewalld cannot be reached; FirewallError when
    it is lost for good: with --no-reconnect, with a private firewalld (which exits with its
    one session), or when firewalld refuses it now."""
    while True:
        try:
            await client.firewall.run_heartbeats()
        except FirewallError as exc:
            if private:
                raise FirewallError(
                    f"lost the firewall session: {exc} (the private shuttle-firewalld exits "
                    "with it: start shuttle-client again)"
                ) from None
            if not client.options.reconnect:
                raise FirewallError(
                    f"lost the firewall session: {exc} (and --no-reconnect)"
                ) from None
            why = str(exc)
        client.firewall_lost = True
        if client.streams.shortcuts is not None:
            client.streams.shortcuts.firewall_lost()
        log.warning(
            "lost the firewall session: %s; opening it again (until then new connections may "
            "go direct, not through the tunnel)",
            why,
        )
        client.streams.publish(FirewallLost(why[:MAX_REASON]))
        port = await _reopen_firewall(client, capture)
        client.firewall_lost = False
        log.info("firewall session open again (method %s, port %d)", client.method, port)
        client.streams.publish(FirewallBack(client.method, port))
        if client.hosts is not None:
            client.hosts.again()


async def _reopen_firewall(client: Running, capture: Capture) -> int:
    """Open the lost firewall session again, retrying while firewalld cannot be reached;
    the port its rules divert to."""
    delay = REOPEN_FIRST
    attempt = 0
    while True:
        attempt += 1
        await asyncio.sleep(delay)
        try:
            async with client.changing:  # no route change between the request and its answer
                await _open_firewall(client, capture, client.method)
                return await capture.reopened()
        except FirewallUnavailable as exc:
            log.debug("opening the firewall session again failed (attempt %d): %s", attempt, exc)
            await client.firewall.close()  # if it opened before the sockets failed
        delay = min(delay * 2, REOPEN_MAX)


async def _start_control(control: ControlServer, chosen: bool) -> None:
    """Listen on the control socket. A second client of the same user finds the default
    taken: it listens beside it, on a path of its own, and says where."""
    try:
        await control.start()
    except ControlInUse:
        if chosen:
            raise
        taken = control.path
        control.move(os.path.join(os.path.dirname(taken), f"control-{os.getpid()}.sock"))
        await control.start()
        log.warning(
            "%s is another client's control socket; this one's is %s "
            "(shuttle-client ctl --control=%s)",
            taken,
            control.path,
            control.path,
        )


def _publisher(
    control: ControlServer, streams: Streams, readiness: Readiness
) -> Callable[[Message], None]:
    """Where events go: to the control socket's subscribers, and how the tunnel and the
    firewall session are now to the service manager."""

    def publish(event: Message) -> None:
        control.publish(event)
        if isinstance(event, Disconnected):
            again = ", reconnecting" if streams.options.reconnect else ""
            readiness.status(f"tunnel lost{again}: {event.reason}")
        elif isinstance(event, Connected) and streams.up == len(streams.tunnels):
            readiness.status(f"connected to {event.remote}")
        elif isinstance(event, FirewallLost):
            readiness.status(f"firewall session lost, opening it again: {event.reason}")
        elif isinstance(event, FirewallBack):
            readiness.status(f"firewall session open again (method {event.method})")

    return publish


def _watch_hosts(streams: Streams, options: Options, sync: HostsSync) -> HostsSync:
    """-H: the first stream's agent looks for host names, again each time it comes back."""

    def watch(index: int) -> None:
        if index == 0:
            streams.tunnels[0].discovery.watch_hosts(options.seed_hosts, sync.update)

    watch(0)
    streams.on_reconnected = watch
    return sync


async def _unless_stopped(stop: "asyncio.Future[str]", step: Awaitable[T]) -> T:
    task = asyncio.ensure_future(step)
    waiting: List[asyncio.Future[Any]] = [task, stop]
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if task not in done:
        task.cancel()
        raise Stopped
    return task.result()


def dns_sockets(listeners: Sequence[socket.socket]) -> List[socket.socket]:
    """Our UDP sockets that nat and nft redirect DNS queries to, on the listeners' addresses
    and port (tproxy: none, firewalld makes its sockets); PlanError if none can bind."""
    if not listeners:
        return []
    try:
        return make_udp_sockets([sock.getsockname()[:2] for sock in listeners])
    except OSError as exc:  # another program has the listeners' port for UDP
        raise PlanError(f"cannot listen for DNS: {exc.strerror}") from None


async def _cancel_the_rest() -> None:
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _set_once(future: "asyncio.Future[str]", value: str) -> None:
    if not future.done():
        future.set_result(value)


def _parse(args: List[str]) -> Options:
    """The options of the command line; exit with one line (or docopt's usage) if bad."""
    try:
        return parse_command_line(args, os.environ)
    except DocoptExit as exc:  # docopt's usage text; exit 2 tells systemd not to retry
        print(exc, file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except UsageError as exc:
        _usage_error(str(exc))


def _usage_error(text: str) -> NoReturn:
    print(f"shuttle-client: error: {text}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console script: shuttle-client, and `shuttle-client ctl ...` (ctl.py)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["ctl"]:
        # Imported here: the tunnel's start need not wait for ctl's own imports.
        from . import ctl  # noqa: PLC0415

        sys.exit(ctl.main(args[1:]))
    try:
        namespace = named_namespace(args, os.environ)
    except UsageError as exc:
        _parse(args)  # a mistake anywhere in the command line: said in context
        _usage_error(str(exc))  # or the name's own
    # Before anything else: a thread or socket made before would stay behind, and the host
    # names among the SUBNETs must resolve in there, as ssh's do.
    if namespace is not None:
        try:
            enter_named(namespace, "shuttle-client")
        except ValueError as exc:
            _usage_error(str(exc))
    options = _parse(args)
    # -D forks here, before asyncio and zmq exist; only the child returns.
    daemon = daemonize() if options.daemon else None
    stderr_log = logs.configure(options.verbose, options.syslog)
    logs.stage("imports and options")
    detach = functools.partial(logging.getLogger().removeHandler, stderr_log)
    readiness = Readiness([detach, daemon.ready] if daemon else [])
    try:
        pidfile = PidFile.create(options.pidfile) if options.pidfile else None
    except PidFileError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_FAILED)
    try:
        status = asyncio.run(run(options, readiness))
    finally:
        if pidfile is not None:
            pidfile.remove()
    sys.exit(status)

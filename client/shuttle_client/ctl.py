"""`shuttle-client ctl`: the control socket's command line, for people (tables, a live
`watch`) and for shell scripts (--json). ControlClient does the talking; this module parses,
formats and computes rates."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, TextIO

from docopt import DocoptExit, docopt
from shuttle_protocol.control_messages import (
    ChannelClosed,
    ChannelOpened,
    Connected,
    Connection,
    ConnectionsAnswer,
    Disconnected,
    FirewallBack,
    FirewallLost,
    Reconnecting,
    StatusAnswer,
)
from shuttle_protocol.firewall_messages import Target
from shuttle_protocol.schema import Message

from .cli import UsageError, parse_seconds
from .control_client import ControlClient, ControlClientError
from .targets import TargetError, describe, endpoint, parse_targets

OPTIONS = "[--control=PATH] [--json] [--timeout=SECONDS]"
USAGE = f"""\
shuttle-client ctl: ask a running shuttle-client how it is, or change what it captures.

Usage:
  shuttle-client ctl {OPTIONS}
                     (status | connections | routes | hosts | stop)
  shuttle-client ctl {OPTIONS} add [-x SUBNET]... [SUBNET...]
  shuttle-client ctl {OPTIONS} remove [-x SUBNET]... [SUBNET...]
  shuttle-client ctl {OPTIONS} watch [--interval=SECONDS] [--count=N]
  shuttle-client ctl {OPTIONS} events [--count=N]
  shuttle-client ctl -h | --help

Commands:
  status                the tunnel's state, its streams and byte totals.
  connections           the open connections and UDP flows, with bytes each way.
  routes                what is captured: subnets, excludes, nameservers.
  hosts                 the host names -H put into the hosts file.
  stop                  stop the client, as SIGTERM does.
  add                   also capture the SUBNETs, and exclude the -x ones (no restart).
  remove                stop capturing the SUBNETs, stop excluding the -x ones.
  watch                 a live table of the connections: bytes and rate each way.
  events                print the client's events as they come.

Options:
  --control=PATH        the client's control socket (default:
                        $XDG_RUNTIME_DIR/shuttle/control.sock, without XDG_RUNTIME_DIR
                        /tmp/shuttle-UID/control.sock).
  --json                JSON for scripts (watch and events: one object per line).
  --timeout=SECONDS     wait this long for each answer (default 5); with events, for
                        each event (default: for ever).
  -x, --exclude=SUBNET  a subnet to exclude, or (remove) to exclude no more.
  --interval=SECONDS    watch: seconds between tables [default: 1].
  --count=N             watch: stop after N tables; events: after N events.
  -h, --help            show this text.

SUBNET is written as for shuttle-client (10.1.0.0/16, [fd00::]/64:80-90, a host name);
a host name is resolved here, now. Exit status: 0 done, 1 failed, 2 a usage mistake.
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's 128 + SIGINT
ANSWER_TIMEOUT = 5.0
MAX_SECONDS = 3600.0
MIN_INTERVAL = 0.1  # each table is two requests: no faster than this
TCP_PATH_TEXT = {
    "ssh": "through ssh's own forwarding (the agent past the cap)",
    "agent": "through the agent",
    "mixed": "through ssh on some streams, the agent on the others",
}
WORDS = ("status", "connections", "routes", "hosts", "stop", "add", "remove", "watch", "events")
# A tty redraws in place: home, each line cleared to its end, the rest of the screen cleared.
HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


@dataclass(frozen=True)
class Command:
    """One ctl command line, checked."""

    word: str
    path: Optional[str]
    json: bool
    timeout: Optional[float]  # None: ANSWER_TIMEOUT for answers, no bound for events
    subnets: tuple[Target, ...] = ()
    excludes: tuple[Target, ...] = ()
    interval: float = 1.0
    count: Optional[int] = None


def parse_args(argv: Sequence[str]) -> Command:
    """The command from ctl's arguments (those after "ctl"); UsageError for a bad value,
    DocoptExit for bad syntax."""
    args = docopt(USAGE, argv=["ctl", *argv])
    word = next(word for word in WORDS if args[word])
    try:
        subnets = parse_targets(args["SUBNET"])
        excludes = parse_targets(args["--exclude"])
    except TargetError as exc:
        raise UsageError(str(exc)) from None
    if word in ("add", "remove") and not subnets and not excludes:
        raise UsageError(f"{word}: give a SUBNET or -x SUBNET")
    timeout_text = args["--timeout"]
    count = args["--count"]
    if count is not None and (not count.isdigit() or int(count) < 1):
        raise UsageError(f"invalid --count {count!r}: expected a whole number from 1")
    return Command(
        word=word,
        path=args["--control"],
        json=bool(args["--json"]),
        timeout=None
        if timeout_text is None
        else parse_seconds("--timeout", timeout_text, 0.001, MAX_SECONDS),
        subnets=subnets,
        excludes=excludes,
        interval=parse_seconds("--interval", args["--interval"], MIN_INTERVAL, MAX_SECONDS),
        count=None if count is None else int(count),
    )


# -- formatting ------------------------------------------------------------------------


def human_bytes(count: float) -> str:
    """1023 B, 1.0 KiB, 12.3 MiB, ... (powers of 1024)."""
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        count /= 1024
        if count < 1024 or unit == "PiB":
            break
    return f"{count:.1f} {unit}"


def human_rate(per_second: Optional[float]) -> str:
    """Bytes per second as human_bytes writes them; "-" when unknown."""
    return "-" if per_second is None else human_bytes(per_second) + "/s"


def human_duration(seconds: float) -> str:
    """12s, 3m04s, 2h05m, 3d04h: the two largest units."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int]) -> list[str]:
    """Aligned lines: the header, then the rows; columns in right are right-aligned."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = (
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))
        )
        return "  ".join(padded).rstrip()

    return [line(header), *map(line, rows)]


def format_status(status: StatusAnswer) -> str:
    rows = [
        ("state", status.state),
        ("remote", status.remote),
        ("method", status.method or "-"),
        ("pid", str(status.pid)),
        ("uptime", human_duration(status.uptime)),
        ("streams", f"{status.streams_up} of {status.streams} up, "
                    f"{plural(status.reconnects, 'reconnect')}"),
        ("open", f"{plural(status.channels, 'connection')}, {plural(status.flows, 'UDP flow')}"),
        ("bytes", f"{human_bytes(status.bytes_up)} up, {human_bytes(status.bytes_down)} down"),
        ("tcp", TCP_PATH_TEXT[status.tcp]),
        *(
            ("shortcut", f"{endpoint((host, port))} straight to ssh's forward on port {local}")
            for host, port, local in status.shortcuts
        ),
    ]  # fmt: skip
    return "".join(f"{name:<9}{value}\n" for name, value in rows)


CONNECTION_HEADER = ("CHANNEL", "STREAM", "PROTO", "SOURCE", "DESTINATION", "UP", "DOWN", "AGE")


def connection_cells(connection: Connection) -> list[str]:
    channel, stream, proto, source, host, port, up, down, age = connection
    return [
        str(channel), str(stream), proto, source, endpoint((host, port)),
        human_bytes(up), human_bytes(down), human_duration(age),
    ]  # fmt: skip


def format_connections(answer: ConnectionsAnswer) -> str:
    if not answer.connections:
        return "no open connections\n"
    rows = [connection_cells(connection) for connection in answer.connections]
    lines = table(CONNECTION_HEADER, rows, frozenset({0, 1, 5, 6, 7}))
    shown = len(answer.connections)
    lines.append(f"{shown} open" if shown == answer.total else f"{shown} of {answer.total} open")
    return "\n".join(lines) + "\n"


def format_routes(
    subnets: Sequence[Target], excludes: Sequence[Target], dns: Sequence[str] = ()
) -> str:
    lines = [f"capture  {describe(target)}" for target in subnets]
    lines += [f"exclude  {describe(target)}" for target in excludes]
    lines += [f"dns      {address}" for address in dns]
    return "\n".join(lines or ["nothing is captured"]) + "\n"


def format_hosts(hosts: Sequence[tuple[str, str]]) -> str:
    if not hosts:
        return "no host names (the client puts them in the hosts file with -H)\n"
    return "\n".join(table(("NAME", "ADDRESS"), hosts, frozenset())) + "\n"


# -- JSON ------------------------------------------------------------------------------


def message_json(msg: Message) -> dict[str, Any]:
    """A message's fields by name."""
    return {name: getattr(msg, name) for name in msg.FIELDS}


CONNECTION_FIELDS = (
    "channel", "stream", "proto", "source", "host", "port", "bytes_up", "bytes_down", "seconds",
)  # fmt: skip


def connection_json(connection: Connection) -> dict[str, Any]:
    return dict(zip(CONNECTION_FIELDS, connection))


def routes_json(
    subnets: Sequence[Target], excludes: Sequence[Target], dns: Sequence[str] = ()
) -> dict[str, Any]:
    """Subnets and excludes as command-line text, which add and remove take back."""
    return {
        "subnets": [describe(target) for target in subnets],
        "excludes": [describe(target) for target in excludes],
        "dns": list(dns),
    }


def event_name(event: Message) -> str:
    """ChannelOpened -> channel_opened."""
    name = type(event).__name__
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def event_json(sequence: int, event: Message) -> dict[str, Any]:
    return {"sequence": sequence, "event": event_name(event), **message_json(event)}


# -- events ----------------------------------------------------------------------------

EVENT_TEXT: Mapping[type[Message], Callable[[Any], str]] = {
    Connected: lambda e: f"stream {e.stream} connected to {e.remote}",
    Disconnected: lambda e: f"stream {e.stream} disconnected: {e.reason}",
    Reconnecting: lambda e: (
        f"stream {e.stream} reconnecting in {e.delay:g} s (attempt {e.attempt})"
    ),
    ChannelOpened: lambda e: (
        f"channel {e.channel} opened: {e.proto} {e.source} -> {endpoint((e.host, e.port))}"
        f" (stream {e.stream})"
    ),
    ChannelClosed: lambda e: (
        f"channel {e.channel} closed: {human_bytes(e.bytes_up)} up,"
        f" {human_bytes(e.bytes_down)} down (stream {e.stream})"
    ),
    FirewallLost: lambda e: f"firewall session lost: {e.reason}",
    FirewallBack: lambda e: f"firewall session open again (method {e.method}, port {e.port})",
}


def format_event(event: Message, clock: float) -> str:
    """One line: the local time the event came, and what happened."""
    return f"{time.strftime('%H:%M:%S', time.localtime(clock))}  {EVENT_TEXT[type(event)](event)}"


def event_lines(
    pairs: Iterable[tuple[int, Message]], as_json: bool, count: Optional[int] = None
) -> Iterator[str]:
    """A line per event (JSON, or the time and what happened), up to count events; a gap
    in the sequence numbers is a line that says how many were missed."""
    expected: Optional[int] = None
    for seen, (sequence, event) in enumerate(pairs, 1):
        if as_json:
            yield json.dumps(event_json(sequence, event))
        else:
            if expected is not None and sequence > expected:
                yield f"({plural(sequence - expected, 'event')} missed)"
            yield format_event(event, time.time())
        expected = sequence + 1
        if seen == count:
            return


def run_events(client: ControlClient, command: Command, out: TextIO) -> int:
    """Print events as they come."""
    for line in event_lines(client.events(command.timeout), command.json, command.count):
        out.write(line + "\n")
        out.flush()
    return EXIT_OK


# -- watch -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """What one refresh asked, and when: at for rates (time.monotonic()), clock to show
    (time.time())."""

    at: float
    status: StatusAnswer
    connections: ConnectionsAnswer
    clock: float


@dataclass(frozen=True)
class Rated:
    """A connection with its rates each way, in bytes per second."""

    connection: Connection
    up: float
    down: float


def connection_key(connection: Connection) -> tuple[Any, ...]:
    # The source too: a channel number alone might come back for another connection.
    channel, stream, proto, source = connection[:4]
    return channel, stream, proto, source


def rate_connections(previous: Optional[Sample], current: Sample) -> list[Rated]:
    """Each connection's rates since the previous sample; for one that the previous sample
    did not have (or with none), since it opened. Fastest first."""
    seconds = current.at - previous.at if previous is not None else 0.0
    before = {}
    if previous is not None and seconds > 0:
        before = {connection_key(c): c for c in previous.connections.connections}
    rated = []
    for connection in current.connections.connections:
        old = before.get(connection_key(connection))
        if old is not None:
            up, down, span = connection[6] - old[6], connection[7] - old[7], seconds
        else:
            up, down, span = connection[6], connection[7], connection[8]
        if span <= 0:
            rated.append(Rated(connection, 0.0, 0.0))
        else:  # counters never shrink for one connection; max() guards against a reused key
            rated.append(Rated(connection, max(up, 0) / span, max(down, 0) / span))
    rated.sort(key=lambda r: (-(r.up + r.down), r.connection[0]))
    return rated


def total_rates(previous: Optional[Sample], current: Sample) -> tuple[float, float]:
    """Every channel's bytes per second since the previous sample (closed ones' too, from
    the status totals), or since the client started."""
    now = current.status
    if previous is not None and current.at > previous.at:
        then, span = previous.status, current.at - previous.at
        up, down = now.bytes_up - then.bytes_up, now.bytes_down - then.bytes_down
    else:
        span, up, down = now.uptime, now.bytes_up, now.bytes_down
    if span <= 0:
        return 0.0, 0.0
    return max(up, 0) / span, max(down, 0) / span


WATCH_HEADER = (*CONNECTION_HEADER[:7], "UP/S", "DOWN/S", "AGE")


def format_watch(
    previous: Optional[Sample], current: Sample, interval: float, height: Optional[int] = None
) -> list[str]:
    """The lines of one table; with height, at most that many (the slowest rows left out)."""
    status, answer = current.status, current.connections
    rated = rate_connections(previous, current)
    up, down = total_rates(previous, current)
    title = (
        f"{time.strftime('%H:%M:%S', time.localtime(current.clock))}  "
        f"shuttle-client pid {status.pid}: {status.state}, {status.remote}"
        f" ({status.method or '-'}), {plural(answer.total, 'connection')}"
        f"{', every ' + format(interval, 'g') + ' s' if previous is None else ''}"
    )
    rows = [
        [*connection_cells(r.connection)[:7], human_rate(r.up), human_rate(r.down),
         human_duration(r.connection[8])]
        for r in rated
    ]  # fmt: skip
    total = ["total", "", "", "", "", human_bytes(status.bytes_up), human_bytes(status.bytes_down)]
    rows.append([*total, human_rate(up), human_rate(down), human_duration(status.uptime)])
    if height is not None and len(rows) + 2 > height:
        # Keep the title, header and totals; say how many rows do not fit.
        keep = max(height - 4, 0)
        hidden = len(rows) - 1 - keep
        rows = [*rows[:keep], [f"(+{hidden})", *[""] * 9], rows[-1]]
    lines = table(WATCH_HEADER, rows, frozenset({0, 1, 5, 6, 7, 8, 9}))
    return [title, *lines]


def watch_json(previous: Optional[Sample], current: Sample) -> dict[str, Any]:
    up, down = total_rates(previous, current)
    return {
        "status": message_json(current.status),
        "connections": [
            {**connection_json(r.connection), "rate_up": r.up, "rate_down": r.down}
            for r in rate_connections(previous, current)
        ],
        "total": current.connections.total,
        "rate_up": up,
        "rate_down": down,
    }


def take_sample(client: ControlClient) -> Sample:
    # Status second: its totals then include every byte the connections show.
    connections = client.connections()
    return Sample(time.monotonic(), client.status(), connections, time.time())


def run_watch(client: ControlClient, command: Command, out: TextIO) -> int:
    """Tables every interval: redrawn in place on a terminal, one after another otherwise."""
    tty = out.isatty() and not command.json
    previous: Optional[Sample] = None
    shown = 0
    if tty:
        out.write(HIDE_CURSOR)
    try:
        while True:
            current = take_sample(client)
            if command.json:
                out.write(json.dumps(watch_json(previous, current)) + "\n")
            elif tty:
                # A line short of the screen, and no line wider: else the terminal scrolls
                # and HOME is no longer the table's top.
                width, height = shutil.get_terminal_size()
                lines = format_watch(previous, current, command.interval, height - 1)
                text = "".join(line[:width] + CLEAR_LINE + "\n" for line in lines)
                out.write(HOME + text + CLEAR_BELOW)
            else:
                out.write("\n".join(format_watch(previous, current, command.interval)) + "\n\n")
            out.flush()
            shown += 1
            if shown == command.count:
                return EXIT_OK
            previous = current
            time.sleep(max(command.interval - (time.monotonic() - current.at), 0.0))
    finally:
        if tty:
            out.write(SHOW_CURSOR)
            out.flush()


# -- the other commands ----------------------------------------------------------------


def emit(out: TextIO, command: Command, data: Any, text: str) -> None:
    out.write(json.dumps(data, indent=2) + "\n" if command.json else text)


def run_status(client: ControlClient, command: Command, out: TextIO) -> int:
    status = client.status()
    emit(out, command, message_json(status), format_status(status))
    return EXIT_OK


def run_connections(client: ControlClient, command: Command, out: TextIO) -> int:
    answer = client.connections()
    data = {"connections": list(map(connection_json, answer.connections)), "total": answer.total}
    emit(out, command, data, format_connections(answer))
    return EXIT_OK


def run_routes(client: ControlClient, command: Command, out: TextIO) -> int:
    answer = client.routes()
    data = routes_json(answer.subnets, answer.excludes, answer.dns)
    emit(out, command, data, format_routes(answer.subnets, answer.excludes, answer.dns))
    return EXIT_OK


def run_add(client: ControlClient, command: Command, out: TextIO) -> int:
    answer = client.add(command.subnets, command.excludes)
    data = routes_json(answer.subnets, answer.excludes)
    emit(out, command, data, format_routes(answer.subnets, answer.excludes))
    return EXIT_OK


def run_remove(client: ControlClient, command: Command, out: TextIO) -> int:
    answer = client.remove(command.subnets, command.excludes)
    data = routes_json(answer.subnets, answer.excludes)
    emit(out, command, data, format_routes(answer.subnets, answer.excludes))
    return EXIT_OK


def run_hosts(client: ControlClient, command: Command, out: TextIO) -> int:
    answer = client.hosts()
    data = [{"name": name, "address": address} for name, address in answer.hosts]
    emit(out, command, data, format_hosts(answer.hosts))
    return EXIT_OK


def run_stop(client: ControlClient, command: Command, out: TextIO) -> int:
    client.stop()
    emit(out, command, {"stopping": True}, "the client is stopping\n")
    return EXIT_OK


RUNNERS: Mapping[str, Callable[[ControlClient, Command, TextIO], int]] = {
    "status": run_status,
    "connections": run_connections,
    "routes": run_routes,
    "hosts": run_hosts,
    "stop": run_stop,
    "add": run_add,
    "remove": run_remove,
    "watch": run_watch,
    "events": run_events,
}
# Ctrl-C is how one ends these: not a failure.
ENDLESS = ("watch", "events")


def main(argv: Sequence[str], out: TextIO = sys.stdout) -> int:
    """`shuttle-client ctl ARGS`: the exit status; one line on stderr if it failed."""
    try:
        command = parse_args(argv)
    except DocoptExit as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"shuttle-client ctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    timeout = ANSWER_TIMEOUT if command.timeout is None else command.timeout
    try:
        with ControlClient(command.path, timeout) as client:
            return RUNNERS[command.word](client, command, out)
    except ControlClientError as exc:
        print(f"shuttle-client ctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK if command.word in ENDLESS else EXIT_INTERRUPTED
    except BrokenPipeError:
        # `ctl events | head -1`: the reader has what it wanted. Python would complain
        # again when it flushes stdout at exit, so that goes nowhere now.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return EXIT_OK

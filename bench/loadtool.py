"""The load the comparison puts on a tunnel; a standalone script (standard library only).

The bench copies it into the test network's directory and runs it with /usr/bin/python3 as
the test user on the client host, against the bench's echo server on the target, through
whichever tunnel is under test. Every command is bounded in count and in time (--timeout) and
prints one JSON line ({"ok": ..., ...}; times in seconds unless the key names another unit):

  rtt HOST PORT         one connection, small echoes one after another: min/median/p99 µs
  conns HOST PORT N     N connections open at once, then each echoes once: wall time
  rate HOST PORT        connect, echo, close, one connection after another, for --seconds
  first-byte HOST PORT  prints "armed", reads a time.time() from stdin (the moment the bench
                        started the tunnel), then starts a new connect-and-echo attempt every
                        --interval until one succeeds: seconds from that moment. Python takes
                        longer to start here than some tunnels, hence the arming. Attempts
                        come from --ports, in turn: see first_byte.
  hold HOST PORT N      N connections, one echo each; prints, then stays idle until stdin
                        closes (the bench reads the tunnel's memory meanwhile)

Plain sockets and one selector, no asyncio and no resolver: the tool must cost far less per
connection than the tunnels it measures.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import selectors
import socket
import statistics
import sys
import time
from typing import Any

MAX_ERRORS = 10  # rate: stop after this many failed connections
OP_TIMEOUT = 5.0  # rtt, rate: one connect or echo (a tunnel's buffers may delay it, not this)
MAX_PENDING = 400  # first-byte: attempts in flight at once
ATTEMPT_TIMEOUT = 1.0  # first-byte: one attempt (its SYN may predate the firewall rules)
READ_SIZE = 65536


def raise_fd_limit() -> None:
    """Ten thousand connections need more than the usual 1024 descriptors."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def payload(index: int, size: int) -> bytes:
    """size bytes that differ per index, so a crossed or reordered echo is seen."""
    head = f"{index}:".encode()
    return (head * (size // len(head) + 1))[:size]


def new_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = new_socket(host)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def exchange(sock: socket.socket, data: bytes) -> None:
    """Send data and read back exactly as many bytes; raise unless they are the same."""
    sock.sendall(data)
    got = bytearray()
    while len(got) < len(data):
        chunk = sock.recv(len(data) - len(got))
        if not chunk:
            raise ConnectionError(f"echo cut short at {len(got)} of {len(data)} bytes")
        got += chunk
    if got != data:
        raise ConnectionError("the echo differs from what was sent")


def rtt(
    host: str, port: int, *, count: int, size: int, seconds: float, timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + min(seconds, timeout)
    samples = []
    with connect(host, port, min(timeout, OP_TIMEOUT)) as sock:
        # Through a proxy the connect completes locally; the first echo would time the remote
        # connect too, so it is not counted.
        exchange(sock, payload(-1, size))
        for index in range(count):
            data = payload(index, size)
            started = time.perf_counter()
            exchange(sock, data)
            samples.append((time.perf_counter() - started) * 1e6)
            if time.monotonic() >= deadline:
                break
    samples.sort()
    return {
        "ok": True,
        "echoes": len(samples),
        "min_us": round(samples[0], 1),
        "median_us": round(statistics.median(samples), 1),
        "p99_us": round(samples[min(len(samples) - 1, len(samples) * 99 // 100)], 1),
        "max_us": round(samples[-1], 1),
    }


def rate(
    host: str, port: int, *, seconds: float, limit: int, size: int, timeout: float
) -> dict[str, Any]:
    started = time.monotonic()
    deadline = started + min(seconds, timeout)
    good = 0
    errors: list[str] = []
    for index in range(limit):
        if time.monotonic() >= deadline or len(errors) >= MAX_ERRORS:
            break
        try:
            with connect(host, port, min(timeout, OP_TIMEOUT)) as sock:
                exchange(sock, payload(index, size))
            good += 1
        except OSError as exc:
            errors.append(f"connection {index}: {exc!r}")
    elapsed = time.monotonic() - started
    return {
        "ok": not errors,
        "connections": good,
        "seconds": round(elapsed, 3),
        "per_second": round(good / elapsed, 1),
        "errors": errors,
    }


class Echoes:
    """Non-blocking connections on one selector, each connecting and then echoing its own
    payload once; open ones stay open until close()."""

    def __init__(
        self, host: str, port: int, size: int, echo_when_open: bool, sources: Ports | None = None
    ) -> None:
        self.address = (host, port)
        self.sources = sources
        self.size = size
        self.echo_when_open = echo_when_open
        self.selector = selectors.DefaultSelector()
        self.socks: dict[int, socket.socket] = {}
        self.started: dict[int, float] = {}
        self.connecting: set[int] = set()
        self.waiting: dict[int, bytearray] = {}  # echo sent, what came back so far
        self.opened: list[int] = []
        self.echoed: list[int] = []
        self.errors: list[str] = []

    def start(self, index: int) -> None:
        sock = new_socket(self.address[0])
        sock.setblocking(False)
        self.socks[index] = sock
        self.started[index] = time.monotonic()
        if self.sources is not None and not self.sources.bind(sock):
            self.drop(index, "no free source port")
            return
        code = sock.connect_ex(self.address)
        if code == 0:
            self.connected(index)
        elif code == errno.EINPROGRESS:
            self.connecting.add(index)
            self.selector.register(sock, selectors.EVENT_WRITE, index)
        else:
            self.drop(index, f"connect: {os.strerror(code)}")

    def connected(self, index: int) -> None:
        self.opened.append(index)
        if self.echo_when_open:
            self.echo(index)

    def echo(self, index: int) -> None:
        sock = self.socks[index]
        data = payload(index, self.size)
        try:
            sent = sock.send(data)  # a small payload fits a fresh socket's buffer
        except OSError as exc:
            self.drop(index, f"send: {exc!r}")
            return
        if sent != len(data):
            self.drop(index, f"send: {sent} of {len(data)} bytes")
            return
        self.waiting[index] = bytearray()
        self.selector.register(sock, selectors.EVENT_READ, index)

    def poll(self, timeout: float) -> list[int]:
        """Handle what is ready within timeout; the connections that echoed just now."""
        done = []
        for key, _events in self.selector.select(max(timeout, 0)):
            index = key.data
            sock = self.socks[index]
            if index in self.connecting:
                self.selector.unregister(sock)
                self.connecting.discard(index)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self.drop(index, f"connect: {os.strerror(code)}")
                else:
                    self.connected(index)
            elif self.received(index, sock):
                done.append(index)
        return done

    def received(self, index: int, sock: socket.socket) -> bool:
        got = self.waiting[index]
        try:
            chunk = sock.recv(READ_SIZE)
        except OSError as exc:
            self.drop(index, f"echo: {exc!r}")
            return False
        got += chunk
        expected = payload(index, self.size)
        if not chunk or got != expected[: len(got)]:
            self.drop(index, "echo: cut short" if not chunk else "echo: differs")
            return False
        if len(got) < len(expected):
            return False
        self.selector.unregister(sock)
        del self.waiting[index]
        self.echoed.append(index)
        return True

    def drop(self, index: int, error: str) -> None:
        sock = self.socks.pop(index)
        if index in self.connecting or index in self.waiting:
            self.selector.unregister(sock)
        self.connecting.discard(index)
        self.waiting.pop(index, None)
        sock.close()
        self.errors.append(f"connection {index}: {error}")

    def expire(self, age: float) -> None:
        """Give up the connections still busy that started more than age seconds ago."""
        oldest = time.monotonic() - age
        for index in [*self.connecting, *self.waiting]:
            if self.started[index] < oldest:
                self.drop(index, "not done in time")

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()
        self.selector.close()


class Ports:
    """Source ports taken in turn from low to high, then low again, skipping busy ones."""

    def __init__(self, low: int, high: int, start: int) -> None:
        self.low, self.high = low, high
        self.next = start if low <= start <= high else low

    def bind(self, sock: socket.socket) -> bool:
        for _ in range(100):  # a few may be busy (a listener); not a whole range
            port = self.next
            self.next = port + 1 if port < self.high else self.low
            try:
                sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", port))  # noqa: S104
                return True
            except OSError:
                continue
        return False


def open_and_echo(
    host: str, port: int, *, count: int, size: int, batch: int, timeout: float
) -> tuple[dict[str, Any], Echoes]:
    """Open count connections (at most batch connects in flight), and only when all are open
    let each echo its own payload: all of them are open end to end at the same time.
    Gives up at timeout; what is done by then counts."""
    started = time.monotonic()
    deadline = started + timeout
    echoes = Echoes(host, port, size, echo_when_open=False)
    launched = 0
    while (launched < count or echoes.connecting) and time.monotonic() < deadline:
        while launched < count and len(echoes.connecting) < batch:
            echoes.start(launched)
            launched += 1
        echoes.poll(min(0.1, deadline - time.monotonic()))
    opened = time.monotonic() - started
    for index in list(echoes.opened):
        echoes.echo(index)
    while echoes.waiting and time.monotonic() < deadline:
        echoes.poll(min(0.1, deadline - time.monotonic()))
    echoes.expire(0)
    good = len(echoes.echoed)
    figures = {
        "ok": good == count,
        "connections": count,
        "opened": len(echoes.opened),
        "good": good,
        "open_seconds": round(opened, 3),
        "seconds": round(time.monotonic() - started, 3),
        "errors": echoes.errors[:5],
    }
    return figures, echoes


def conns(
    host: str, port: int, *, count: int, size: int, batch: int, timeout: float
) -> dict[str, Any]:
    figures, echoes = open_and_echo(
        host, port, count=count, size=size, batch=batch, timeout=timeout
    )
    echoes.close()
    return figures


def wait_stdin_closed(limit: float) -> None:
    deadline = time.monotonic() + limit
    fd = sys.stdin.fileno()
    while time.monotonic() < deadline:
        readable, _w, _x = select.select([fd], [], [], deadline - time.monotonic())
        if readable and not os.read(fd, 4096):
            return


def hold(
    host: str, port: int, *, count: int, size: int, batch: int, timeout: float, idle: float
) -> dict[str, Any]:
    figures, echoes = open_and_echo(
        host, port, count=count, size=size, batch=batch, timeout=timeout
    )
    print(json.dumps(figures), flush=True)
    wait_stdin_closed(idle)
    echoes.close()
    return figures


def first_byte(
    host: str, port: int, *, interval: float, ports: Ports, size: int, timeout: float
) -> dict[str, Any]:
    """An attempt made before a tunnel's NAT rules exist leaves a conntrack entry without the
    redirect (SYN_SENT, for two minutes): a later SYN from the same source port matches it
    and is lost too. So attempts come from ports no other connection uses (the bench keeps
    them out of the ephemeral range), each used once in a long while (the bench passes on
    where the last run stopped, which the result says)."""
    print("armed", flush=True)
    since = float(sys.stdin.readline())
    deadline = time.monotonic() + timeout
    echoes = Echoes(host, port, size, echo_when_open=True, sources=ports)
    attempts = 0
    next_attempt = time.monotonic()
    try:
        while time.monotonic() < deadline:
            if time.monotonic() >= next_attempt:
                if len(echoes.connecting) + len(echoes.waiting) < MAX_PENDING:
                    echoes.start(attempts)
                    attempts += 1
                next_attempt += interval
            if echoes.echoed or echoes.poll(next_attempt - time.monotonic()):
                seconds = round(time.time() - since, 4)
                return {"ok": True, "seconds": seconds, "attempts": attempts, "next": ports.next}
            echoes.expire(ATTEMPT_TIMEOUT)
    finally:
        echoes.close()
    last = echoes.errors[-1] if echoes.errors else "none"
    error = f"no echo in {timeout:g} s; last error: {last}"
    return {"ok": False, "error": error, "next": ports.next}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loadtool", description="tunnel load for the bench")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "rtt": "sequential small echoes on one connection",
        "conns": "N simultaneous connections, one echo each",
        "rate": "sequential connect-echo-close",
        "first-byte": "time from a moment read on stdin to the first echo that gets through",
        "hold": "N connections, one echo each, then idle until stdin closes",
    }
    for name, text in commands.items():
        command = sub.add_parser(name, help=text)
        command.add_argument("host")
        command.add_argument("port", type=int)
        if name in ("conns", "hold"):
            command.add_argument("count", type=int)
            command.add_argument("--batch", type=int, default=1000, help="connects in flight")
        command.add_argument("--size", type=int, default=64, help="bytes per echo")
        command.add_argument("--timeout", type=float, default=60, help="for the whole command")
    subs = sub.choices
    subs["rtt"].add_argument("--count", type=int, default=1000)
    subs["rtt"].add_argument("--seconds", type=float, default=3, help="stop after this long")
    subs["rate"].add_argument("--seconds", type=float, default=5)
    subs["rate"].add_argument("--limit", type=int, default=1_000_000, help="connections")
    subs["first-byte"].add_argument("--interval", type=float, default=0.005)
    subs["first-byte"].add_argument("--ports", required=True, help="source ports: LOW-HIGH")
    subs["first-byte"].add_argument("--from", dest="start", type=int, default=0, help="port")
    subs["hold"].add_argument("--idle", type=float, default=120, help="hold at most this long")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    host, port = args.host, args.port
    common = {"size": args.size, "timeout": args.timeout}
    if args.command == "rtt":
        return rtt(host, port, count=args.count, seconds=args.seconds, **common)
    if args.command == "rate":
        return rate(host, port, seconds=args.seconds, limit=args.limit, **common)
    if args.command == "conns":
        return conns(host, port, count=args.count, batch=args.batch, **common)
    if args.command == "hold":
        return hold(host, port, count=args.count, batch=args.batch, idle=args.idle, **common)
    low, _, high = args.ports.partition("-")
    ports = Ports(int(low), int(high), args.start)
    return first_byte(host, port, interval=args.interval, ports=ports, **common)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    raise_fd_limit()
    try:
        result = run(args)
    except (OSError, ValueError) as exc:
        result = {"ok": False, "error": repr(exc)}
    if args.command != "hold" or "error" in result:  # hold printed its figures itself
        print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

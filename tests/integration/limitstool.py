"""Programs that push a tunnel against its limits; a standalone script (standard library only).

Copied beside tcptool.py into the test network's directory and run with /usr/bin/python3: as
root on the target (the sink server), as the test user on the client host (the rest). Every
command is bounded in count and time and prints JSON lines ({"ok": ...} last).

  serve-sink HOST PORT   accepts connections and never reads from them (a stalled remote);
                         holds at most MAX_HELD of them, until SIGTERM.
  flood HOST PORT N      one keeper connection that echoes; then N more connections at once,
                         each sending one small echo; the keeper echoes every --every seconds
                         meanwhile. Prints each flood connection's fate (echoed, reset, eof,
                         hanging, or a connect error), then closes them, and checks that the
                         keeper and a new connection still echo.
  push HOST PORT         sends as fast as the socket takes it until it takes nothing for
                         --idle seconds (the sender is blocked) or --max bytes went; prints
                         {"sent", "blocked"}; then holds the connection until stdin closes.
  hang HOST PORT SIZE SEED
                         asks tcptool's bulk server for SIZE bytes and does not read them;
                         prints "holding"; when stdin says "read", reads them all and checks
                         their sha256 against tcptool's pattern (nothing lost, nothing mixed).
"""

import argparse
import errno
import hashlib
import json
import os
import select
import selectors
import signal
import socket
import sys
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# tcptool.py is beside this file in the tools directory (in the repository: testbed/).
from tcptool import pattern_sha256, raise_fd_limit  # type: ignore[import-not-found]

MAX_HELD = 1000
CHUNK = 1 << 16
ECHO_SIZE = 64


def emit(result: Dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def new_socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)


# --- the stalled remote ---------------------------------------------------------------------


def serve_sink(host: str, port: int) -> None:
    """Accept and hold connections, never reading: their senders fill every buffer."""
    listener = new_socket(host)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    held: List[socket.socket] = []
    stop: List[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    print(f"limitstool: sink listening on {host}:{port}", flush=True)
    while not stop:
        readable, _w, _x = select.select([listener], [], [], 0.5)
        if readable and len(held) < MAX_HELD:
            conn, _addr = listener.accept()
            held.append(conn)
            print(f"limitstool: sink holds {len(held)}", flush=True)
    for conn in held:
        conn.close()
    listener.close()


# --- echo helpers ---------------------------------------------------------------------------


def echo_once(sock: socket.socket, data: bytes, timeout: float) -> str:
    """Send data and read it back on a blocking socket: "" if it came back, else why not."""
    sock.settimeout(timeout)
    try:
        sock.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = sock.recv(len(data) - len(got))
            if not chunk:
                return f"eof after {len(got)} bytes"
            got += chunk
    except OSError as exc:
        return repr(exc)
    return "" if got == data else "echo differs"


def connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = new_socket(host)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


# --- flood ----------------------------------------------------------------------------------


class Flood:
    """count non-blocking connections, each sending one small payload as soon as it is
    connected and waiting for its echo; what became of each."""

    def __init__(self, host: str, port: int, count: int) -> None:
        self.address = (host, port)
        self.selector = selectors.DefaultSelector()
        self.socks: Dict[int, socket.socket] = {}
        self.got: Dict[int, bytes] = {}
        self.fate: Dict[int, str] = {}
        for index in range(count):
            sock = new_socket(host)
            sock.setblocking(False)
            self.socks[index] = sock
            code = sock.connect_ex(self.address)
            if code in (0, errno.EINPROGRESS):
                self.selector.register(sock, selectors.EVENT_WRITE, index)
            else:
                self.fate[index] = f"connect: {os.strerror(code)}"

    @staticmethod
    def payload(index: int) -> bytes:
        return f"flood {index}:".encode().ljust(ECHO_SIZE, b".")

    @property
    def busy(self) -> int:
        return len(self.socks) - len(self.fate)

    def poll(self, timeout: float) -> None:
        for key, events in self.selector.select(max(timeout, 0)):
            index, sock = key.data, key.fileobj
            assert isinstance(sock, socket.socket)
            if events & selectors.EVENT_WRITE:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self.done(index, self.why(OSError(code, os.strerror(code))))
                    continue
                try:
                    sock.send(self.payload(index))
                except OSError as exc:
                    self.done(index, self.why(exc))
                    continue
                self.got[index] = b""
                self.selector.modify(sock, selectors.EVENT_READ, index)
            else:
                self.receive(index, sock)

    def receive(self, index: int, sock: socket.socket) -> None:
        try:
            chunk = sock.recv(CHUNK)
        except OSError as exc:
            self.done(index, self.why(exc))
            return
        if not chunk:
            self.done(index, "eof")
            return
        self.got[index] += chunk
        expected = self.payload(index)
        if self.got[index] == expected:
            self.done(index, "echoed")
        elif not expected.startswith(self.got[index]):
            self.done(index, "echo differs")

    @staticmethod
    def why(exc: OSError) -> str:
        # A send after the reset says EPIPE.
        return "reset" if exc.errno in (errno.ECONNRESET, errno.EPIPE) else f"error: {exc!r}"

    def done(self, index: int, fate: str) -> None:
        self.fate[index] = fate
        self.selector.unregister(self.socks[index])

    def hanging(self) -> None:
        """What is still busy now hangs: neither echoed nor refused."""
        for index in self.socks:
            if index not in self.fate:
                connected = index in self.got
                self.done(index, "hanging" if connected else "connect hanging")

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()
        self.selector.close()

    def fates(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for fate in self.fate.values():
            counts[fate] = counts.get(fate, 0) + 1
        return counts


def flood(host: str, port: int, count: int, every: float, wait: float) -> Dict[str, Any]:
    keeper = connect(host, port, wait)
    keeper_errors: List[str] = []
    first = echo_once(keeper, b"keeper: before", wait)
    if first:
        return {"ok": False, "error": f"the keeper does not echo before the flood: {first}"}
    flood = Flood(host, port, count)
    deadline = time.monotonic() + wait
    keeper_echoes = 0
    for turn in range(int(wait / max(every, 0.01)) + 2):
        if not flood.busy or time.monotonic() >= deadline:
            break
        flood.poll(min(every, deadline - time.monotonic()))
        error = echo_once(keeper, f"keeper: during {turn}".encode(), wait)
        keeper_echoes += 1
        if error:
            keeper_errors.append(f"during the flood, echo {turn}: {error}")
            break
    flood.hanging()
    fates = flood.fates()
    flood.close()
    after = []
    for turn in range(3):
        error = echo_once(keeper, f"keeper: after {turn}".encode(), wait)
        if error:
            keeper_errors.append(f"after the flood, echo {turn}: {error}")
    keeper.close()
    try:
        fresh = connect(host, port, wait)
        after.append(echo_once(fresh, b"a new connection after the flood", wait))
        fresh.close()
    except OSError as exc:
        after.append(f"connect: {exc!r}")
    return {
        "ok": not keeper_errors and not any(after),
        "flood": count,
        "fates": fates,
        "keeper_echoes_during": keeper_echoes,
        "keeper_errors": keeper_errors,
        "new_connection": after[0] or "echoed",
    }


# --- push and hang --------------------------------------------------------------------------


def wait_stdin(limit: float, word: str = "") -> bool:
    """Wait (at most limit seconds) for stdin to close, or with word for a line saying it."""
    deadline = time.monotonic() + limit
    for _ in range(int(limit * 10) + 2):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        readable, _w, _x = select.select([sys.stdin], [], [], min(left, 0.1))
        if readable:
            line = sys.stdin.readline()
            if not line or (word and line.strip() == word):
                return True
    return False


def push(host: str, port: int, max_bytes: int, idle: float, hold: float) -> Dict[str, Any]:
    """Send until blocked for idle seconds (or max_bytes sent), then hold until stdin closes."""
    sock = connect(host, port, 10)
    sock.setblocking(False)
    block = os.urandom(CHUNK)
    sent = 0
    last_progress = time.monotonic()
    blocked = False
    for _ in range(max_bytes // 1024 + 1000):  # each turn sends something or waits
        if sent >= max_bytes:
            break
        try:
            n = sock.send(block)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            emit({"ok": False, "error": f"send after {sent} bytes: {exc!r}"})
            return {"ok": False}
        if n:
            sent += n
            last_progress = time.monotonic()
            continue
        if time.monotonic() - last_progress >= idle:
            blocked = True
            break
        select.select([], [sock], [], 0.05)
    emit({"ok": True, "sent": sent, "blocked": blocked})
    wait_stdin(hold)
    sock.close()
    return {"ok": True, "closed": True}


def hang(host: str, port: int, size: int, seed: str, hold: float) -> Dict[str, Any]:
    """Ask for size bytes, hold them unread until told to read, then check them all."""
    sock = connect(host, port, 10)
    sock.sendall(f"DOWN {size} {seed}\n".encode())
    emit({"holding": True})
    if not wait_stdin(hold, "read"):
        sock.close()
        return {"ok": False, "error": f"no 'read' within {hold}s"}
    sock.settimeout(60)
    digest = hashlib.sha256()
    received = 0
    try:
        for _ in range(size // 1024 + 1000):  # each turn reads at least a byte, or ends
            chunk = sock.recv(1 << 18)
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
    except OSError as exc:
        return {"ok": False, "error": f"read after {received} bytes: {exc!r}"}
    finally:
        sock.close()
    ok = received == size and digest.hexdigest() == pattern_sha256(seed, size)
    return {"ok": ok, "received": received, "expected": size}


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="limitstool", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve-sink", "flood", "push", "hang"):
        command = sub.add_parser(name)
        command.add_argument("host")
        command.add_argument("port", type=int)
    subs = sub.choices
    subs["flood"].add_argument("count", type=int)
    subs["flood"].add_argument("--every", type=float, default=0.2, help="keeper echo interval")
    subs["flood"].add_argument("--wait", type=float, default=30, help="for the flood's fates")
    subs["push"].add_argument("--max", type=int, default=1 << 30, help="bytes at most")
    subs["push"].add_argument("--idle", type=float, default=2, help="blocked this long: stop")
    subs["push"].add_argument("--hold", type=float, default=120, help="then hold at most")
    subs["hang"].add_argument("size", type=int)
    subs["hang"].add_argument("seed")
    subs["hang"].add_argument("--hold", type=float, default=120, help="unread at most")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    raise_fd_limit()
    if args.command == "serve-sink":
        serve_sink(args.host, args.port)
        return 0
    try:
        if args.command == "flood":
            result = flood(args.host, args.port, args.count, args.every, args.wait)
        elif args.command == "push":
            result = push(args.host, args.port, args.max, args.idle, args.hold)
        else:
            result = hang(args.host, args.port, args.size, args.seed, args.hold)
    except OSError as exc:
        result = {"ok": False, "error": repr(exc)}
    emit(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

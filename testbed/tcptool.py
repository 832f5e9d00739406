"""TCP and UDP test servers and the clients that check them; a standalone script (standard
library only).

It is copied into the test network's directory and run there with /usr/bin/python3: as root
on the target (servers) and as the test user on the client host (checks). Servers:

  echo:     sends back every byte it receives, until EOF.
  bulk:     reads one header line, then
            "UP n"        -> reads n bytes, answers the sha256 hex of them and a newline;
            "DOWN n seed" -> sends n bytes of pattern(seed), then closes;
            "SHUT"        -> sends "bye\n", shuts down its sending side (a half-close),
                             reads until EOF and logs how many bytes came after it.
  udp-echo: sends every datagram back to its sender, from the address and port it was sent
            to (IP_PKTINFO: a wildcard socket would otherwise answer from whichever address
            the route prefers, and the target has two per family).

Each check prints one JSON line ({"ok": ..., ...}) and exits 0 only if everything matched.
The UDP checks:

  udp:        sends distinct datagrams one at a time (sizes up to 1400 bytes and one big one)
              and waits for each one's echo, resending a few times (UDP may drop); an echo
              counts only if its payload is the same and it comes from the target's address
              and port (an unconnected socket, so recvfrom shows where it came from).
  udp-silent: sends a few datagrams and checks that nothing at all comes back in time.
"""

import argparse
import asyncio
import hashlib
import ipaddress
import json
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

CHUNK = 1 << 20
READ_SIZE = 1 << 18
MAX_HEADER = 200
MAX_BYTES = 1 << 40


def pattern(seed: str, size: int) -> Iterator[bytes]:
    """size bytes of deterministic pseudo-random data: SHAKE-256 of seed and block number."""
    block = 0
    left = size
    while left > 0:
        data = hashlib.shake_256(f"{seed}:{block}".encode()).digest(min(CHUNK, left))
        yield data
        left -= len(data)
        block += 1


def pattern_sha256(seed: str, size: int) -> str:
    digest = hashlib.sha256()
    for data in pattern(seed, size):
        digest.update(data)
    return digest.hexdigest()


def raise_fd_limit() -> None:
    """Thousands of concurrent connections need more than the usual 1024 descriptors."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- servers -------------------------------------------------------------------------------


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


async def handle_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        await close(writer)


async def bulk_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int) -> None:
    digest = hashlib.sha256()
    left = size
    while left > 0:
        data = await reader.read(min(READ_SIZE, left))
        if not data:
            writer.write(f"ERR short by {left}\n".encode())
            return
        digest.update(data)
        left -= len(data)
    writer.write(digest.hexdigest().encode() + b"\n")


async def bulk_down(writer: asyncio.StreamWriter, size: int, seed: str) -> None:
    for data in pattern(seed, size):
        writer.write(data)
        await writer.drain()


async def half_close_then_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"bye\n")
    writer.write_eof()
    await writer.drain()
    count = 0
    try:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            count += len(data)
    finally:
        print(f"tcptool: after its half-close, bulk read {count} bytes", flush=True)


async def handle_bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        words = (await reader.readline())[:MAX_HEADER].decode(errors="replace").split()
        if len(words) == 2 and words[0] == "UP" and words[1].isdigit():
            await bulk_up(reader, writer, min(int(words[1]), MAX_BYTES))
        elif len(words) == 3 and words[0] == "DOWN" and words[1].isdigit():
            await bulk_down(writer, min(int(words[1]), MAX_BYTES), words[2])
        elif words == ["SHUT"]:
            await half_close_then_read(reader, writer)
        else:
            writer.write(b"ERR bad header\n")
        await writer.drain()
    except (OSError, ValueError):
        pass
    finally:
        await close(writer)


async def serve(kind: str, host: str, port: int) -> None:
    """Serve on host, which may list several addresses: "0.0.0.0,::" is both families."""
    handler = handle_echo if kind == "echo" else handle_bulk
    hosts = host.split(",")
    server = await asyncio.start_server(handler, hosts, port, backlog=8192, reuse_address=True)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    print(f"tcptool: {kind} listening on {host}:{port}", flush=True)
    async with server:
        await stop


# --- UDP echo server -----------------------------------------------------------------------

IP_PKTINFO = 8  # <linux/in.h>; Python's socket module does not always name it
UDP_MAX = 65535
UDP_BATCH = 64  # datagrams read from one socket before the others get their turn


def udp_socket(host: str, port: int) -> socket.socket:
    """A UDP socket bound to host:port that learns each datagram's destination address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # "::" alone, beside "0.0.0.0": IPv4 stays with the IPv4 socket.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def reply_from(ancdata: List[Tuple[int, int, bytes]]) -> List[Tuple[int, int, bytes]]:
    """The ancillary data that makes the answer leave from the received datagram's
    destination address (interface left to the routing)."""
    reply = []
    for level, kind, value in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= 12:
            # struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr}: addr is the
            # header's destination; spec_dst is the source of what we send.
            reply.append((level, kind, struct.pack("=i4s4s", 0, value[8:12], bytes(4))))
        elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(value) >= 16:
            # struct in6_pktinfo {in6_addr addr; int ifindex}
            reply.append((level, kind, value[:16] + struct.pack("=i", 0)))
    return reply


def echo_datagrams(sock: socket.socket) -> int:
    """Echo what is waiting on sock (at most UDP_BATCH datagrams); how many were echoed."""
    echoed = 0
    for _ in range(UDP_BATCH):
        try:
            data, ancdata, _flags, peer = sock.recvmsg(UDP_MAX, socket.CMSG_SPACE(64))
        except BlockingIOError:
            break
        except OSError as exc:  # an ICMP error of an earlier answer, say: not fatal
            print(f"tcptool: udp-echo: receive: {exc!r}", flush=True)
            continue
        try:
            sock.sendmsg([data], reply_from(ancdata), 0, peer)
            echoed += 1
        except OSError as exc:
            print(f"tcptool: udp-echo: answer to {peer}: {exc!r}", flush=True)
    return echoed


def serve_udp(host: str, port: int) -> None:
    """Echo datagrams on every address listed in host until SIGTERM or SIGINT."""
    socks = [udp_socket(address, port) for address in host.split(",")]
    stop: List[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ, sock)
    print(f"tcptool: udp-echo listening on {host}:{port}", flush=True)
    echoed = 0
    while not stop:
        for key, _events in selector.select(timeout=0.5):
            echoed += echo_datagrams(key.data)
    print(f"tcptool: udp-echo stopped after {echoed} datagrams", flush=True)
    for sock in socks:
        sock.close()


# --- checks (clients) ----------------------------------------------------------------------


async def check_up(host: str, port: int, size: int, seed: str) -> Dict[str, Any]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"UP {size}\n".encode())
    digest = hashlib.sha256()
    for data in pattern(seed, size):
        digest.update(data)
        writer.write(data)
        await writer.drain()
    answer = (await reader.readline()).decode(errors="replace").strip()
    await close(writer)
    expected = digest.hexdigest()
    return {"ok": answer == expected, "bytes": size, "expected": expected, "got": answer}


async def check_down(host: str, port: int, size: int, seed: str) -> Dict[str, Any]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"DOWN {size} {seed}\n".encode())
    await writer.drain()
    digest = hashlib.sha256()
    received = 0
    while True:
        data = await reader.read(READ_SIZE)
        if not data:
            break
        digest.update(data)
        received += len(data)
    await close(writer)
    expected = pattern_sha256(seed, size)
    got = digest.hexdigest()
    return {"ok": got == expected, "bytes": received, "expected": expected, "got": got}


async def check_local_half_close(host: str, port: int, size: int) -> Dict[str, Any]:
    """Send size bytes to the echo server, shut down our sending side, read the echo."""
    reader, writer = await asyncio.open_connection(host, port)
    payload = echo_payload(0, size)
    writer.write(payload)
    writer.write_eof()
    await writer.drain()
    received = await reader.read(-1)  # until EOF
    await close(writer)
    return {"ok": received == payload, "bytes": len(received)}


async def check_remote_half_close(host: str, port: int, size: int) -> Dict[str, Any]:
    """Ask the bulk server to half-close (SHUT), read its greeting to EOF, then send size
    bytes and shut down our side; whether the server got them is in its log."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"SHUT\n")
    greeting = await reader.read(-1)
    error = ""
    try:
        writer.write(echo_payload(0, size))
        writer.write_eof()
        await writer.drain()
    except OSError as exc:
        error = repr(exc)
    await close(writer)
    return {
        "ok": greeting == b"bye\n",
        "greeting": greeting.decode(errors="replace"),
        "error": error,
    }


def echo_payload(index: int, size: int) -> bytes:
    head = f"connection {index}:".encode()
    return head + hashlib.shake_256(head).digest(max(size - len(head), 0))


async def check_echo(
    host: str, port: int, count: int, size: int, open_batch: int
) -> Dict[str, Any]:
    """Open count connections, and only when all are open send each its own payload.

    No connection is closed before every echo came back, so all of them are open end to end
    at the same time.
    """
    gate = asyncio.Semaphore(open_batch)

    async def connect() -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with gate:
            return await asyncio.open_connection(host, port)

    opened = await asyncio.gather(*(connect() for _ in range(count)), return_exceptions=True)
    conns: List[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: List[str] = []
    for item in opened:
        if isinstance(item, BaseException):
            errors.append(f"connect: {item!r}")
        else:
            conns.append(item)

    async def one(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        payload = echo_payload(index, size)
        writer.write(payload)
        await writer.drain()
        try:
            got = await reader.readexactly(len(payload))
        except asyncio.IncompleteReadError as exc:
            return f"connection {index}: short echo, {len(exc.partial)} of {len(payload)} bytes"
        return "" if got == payload else f"connection {index}: echo differs"

    results = await asyncio.gather(
        *(one(i, r, w) for i, (r, w) in enumerate(conns)), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            errors.append(f"echo: {result!r}")
        elif result:
            errors.append(result)
    await asyncio.gather(*(close(w) for _r, w in conns), return_exceptions=True)
    good = count - len(errors)
    return {"ok": not errors, "connections": count, "good": good, "errors": errors[:10]}


async def with_deadline(coro: Any, timeout: float) -> Dict[str, Any]:
    start = time.monotonic()
    try:
        result: Dict[str, Any] = await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        result = {"ok": False, "error": f"no result within {timeout}s"}
    except OSError as exc:
        result = {"ok": False, "error": repr(exc)}
    result["seconds"] = round(time.monotonic() - start, 3)
    return result


def udp_sizes(count: int, big: int, largest: int = 1400) -> List[int]:
    """count payload sizes: from 32 up to largest bytes, and one big one (if big > 0)."""
    small = count - 1 if big > 0 and count > 0 else count
    sizes = [32 + (largest - 32) * i // max(small - 1, 1) for i in range(small)]
    return sizes + ([big] if small < count else [])


def udp_payload(run: str, index: int, size: int) -> bytes:
    head = f"datagram {run} {index}:".encode()
    return head + hashlib.shake_256(head).digest(max(size - len(head), 0))


class UdpPeer:
    """An unconnected UDP socket towards host:port, and what came back to it."""

    def __init__(self, host: str, port: int) -> None:
        self.target = ipaddress.ip_address(host)
        self.port = port
        family = socket.AF_INET6 if self.target.version == 6 else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.address = (host, port)
        self.sent: Dict[bytes, int] = {}  # payload -> index
        self.late = 0  # echoes of earlier datagrams (their first try's, after a resend)
        self.garbled: List[str] = []  # datagrams that are no echo of anything sent
        self.sources: List[str] = []  # where answers came from, each once

    def send(self, index: int, payload: bytes) -> None:
        self.sent[payload] = index
        self.sock.sendto(payload, self.address)

    def receive(self, wait: float) -> Optional[Tuple[bytes, Tuple[Any, ...]]]:
        """The next datagram and its source, or None if none comes within wait seconds."""
        self.sock.settimeout(max(wait, 0.001))
        try:
            data, source = self.sock.recvfrom(UDP_MAX)
        except socket.timeout:
            return None
        text = (
            f"{source[0]}:{source[1]}"
            if self.target.version == 4
            else "[{}]:{}".format(*source[:2])
        )
        if text not in self.sources:
            self.sources.append(text)
        return data, source

    def from_target(self, source: Tuple[Any, ...]) -> bool:
        return ipaddress.ip_address(source[0]) == self.target and source[1] == self.port

    def wait_echo(self, payload: bytes, wait: float) -> str:
        """Wait up to wait seconds for payload's echo: "ok", "wrong source ..." or ""
        (nothing). Other datagrams that arrive meanwhile are counted and skipped."""
        deadline = time.monotonic() + wait
        for _ in range(10000):  # bounded: each turn takes a datagram or ends the wait
            left = deadline - time.monotonic()
            got = self.receive(left) if left > 0 else None
            if got is None:
                return ""
            data, source = got
            if data == payload:
                return "ok" if self.from_target(source) else f"wrong source {source[:2]}"
            if data in self.sent:
                self.late += 1
            else:
                self.garbled.append(f"{len(data)} bytes from {source[:2]}")
        return ""


def check_udp(
    host: str, port: int, *, count: int, big: int, tries: int, wait: float, timeout: float
) -> Dict[str, Any]:
    """Each datagram in turn: send, wait for its echo, resend up to tries times in all."""
    deadline = time.monotonic() + timeout
    peer = UdpPeer(host, port)
    run = os.urandom(4).hex()
    sizes = udp_sizes(count, big)
    echoed = 0
    resent = 0
    missing: List[int] = []
    wrong: List[str] = []
    errors: List[str] = []
    try:
        for index, size in enumerate(sizes):
            payload = udp_payload(run, index, size)
            outcome = ""
            for attempt in range(tries):
                if time.monotonic() >= deadline:
                    break
                resent += attempt > 0
                try:
                    peer.send(index, payload)
                except OSError as exc:
                    errors.append(f"datagram {index} ({size} bytes): send: {exc!r}")
                    break
                outcome = peer.wait_echo(payload, min(wait, deadline - time.monotonic()))
                if outcome:
                    break
            if outcome == "ok":
                echoed += 1
            elif outcome:
                wrong.append(f"datagram {index} ({size} bytes): {outcome}")
            else:
                missing.append(index)
        if time.monotonic() >= deadline:
            errors.append(f"no result within {timeout}s")
    finally:
        peer.sock.close()
    ok = echoed == count and not wrong and not peer.garbled and not errors
    return {
        "ok": ok,
        "datagrams": count,
        "echoed": echoed,
        "sizes": [min(sizes), max(sizes)] if sizes else [],
        "resent": resent,
        "late": peer.late,
        "missing": missing[:20],
        "wrong_source": wrong[:10],
        "garbled": peer.garbled[:10],
        "sources": peer.sources[:10],
        "errors": errors[:10],
    }


def check_udp_silent(host: str, port: int, count: int, wait: float) -> Dict[str, Any]:
    """Send count datagrams; ok if nothing comes back within wait seconds of the last."""
    peer = UdpPeer(host, port)
    run = os.urandom(4).hex()
    answers = 0
    errors: List[str] = []
    try:
        for index in range(count):
            try:
                peer.send(index, udp_payload(run, index, 64))
            except OSError as exc:
                errors.append(f"send: {exc!r}")
        deadline = time.monotonic() + wait
        for _ in range(10000):  # bounded: each turn takes a datagram or ends the wait
            left = deadline - time.monotonic()
            if left <= 0 or peer.receive(left) is None:
                break
            answers += 1
    finally:
        peer.sock.close()
    return {
        "ok": answers == 0 and not errors,
        "sent": count,
        "answers": answers,
        "sources": peer.sources[:10],
        "errors": errors,
    }


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tcptool", description="TCP test servers and checks")
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("serve", help="run a server until SIGTERM")
    server.add_argument("kind", choices=["echo", "bulk", "udp-echo"])
    server.add_argument("host", help="address to listen on; several: comma-separated")
    server.add_argument("port", type=int)
    for name in ("up", "down"):
        bulk = sub.add_parser(name, help=f"bulk {name}load check, compared by sha256")
        bulk.add_argument("host")
        bulk.add_argument("port", type=int)
        bulk.add_argument("size", type=int)
        bulk.add_argument("seed")
        bulk.add_argument("--timeout", type=float, default=60)
    echo = sub.add_parser("echo", help="many simultaneous echo connections")
    echo.add_argument("host")
    echo.add_argument("port", type=int)
    echo.add_argument("count", type=int)
    echo.add_argument("--size", type=int, default=4096)
    echo.add_argument("--open-batch", type=int, default=500)
    echo.add_argument("--timeout", type=float, default=60)
    for name in ("half-close-local", "half-close-remote"):
        half = sub.add_parser(name, help="half-close: ours (echo server) or the server's (bulk)")
        half.add_argument("host")
        half.add_argument("port", type=int)
        half.add_argument("size", type=int)
        half.add_argument("--timeout", type=float, default=60)
    udp = sub.add_parser("udp", help="UDP echo check: payloads and the answers' source")
    udp.add_argument("host")
    udp.add_argument("port", type=int)
    udp.add_argument("--count", type=int, default=20, help="datagrams, the big one included")
    udp.add_argument("--big", type=int, default=8000, help="size of the big one (0: none)")
    udp.add_argument("--tries", type=int, default=3, help="sends per datagram, at most")
    udp.add_argument("--wait", type=float, default=2, help="seconds to wait for each echo")
    udp.add_argument("--timeout", type=float, default=200, help="for the whole check")
    silent = sub.add_parser("udp-silent", help="UDP: nothing comes back (not captured)")
    silent.add_argument("host")
    silent.add_argument("port", type=int)
    silent.add_argument("--count", type=int, default=3)
    silent.add_argument("--wait", type=float, default=2, help="seconds of silence expected")
    silent.add_argument("--timeout", type=float, default=60, help="at most this --wait")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    raise_fd_limit()
    if args.command == "serve" and args.kind == "udp-echo":
        serve_udp(args.host, args.port)
        return 0
    if args.command == "serve":
        asyncio.run(serve(args.kind, args.host, args.port))
        return 0
    if args.command in ("udp", "udp-silent"):
        start = time.monotonic()
        if args.command == "udp":
            result = check_udp(
                args.host,
                args.port,
                count=args.count,
                big=args.big,
                tries=args.tries,
                wait=args.wait,
                timeout=args.timeout,
            )
        else:
            wait = min(args.wait, args.timeout)
            result = check_udp_silent(args.host, args.port, args.count, wait)
        result["seconds"] = round(time.monotonic() - start, 3)
        print(json.dumps(result), flush=True)
        return 0 if result["ok"] else 1
    if args.command == "up":
        coro = check_up(args.host, args.port, args.size, args.seed)
    elif args.command == "down":
        coro = check_down(args.host, args.port, args.size, args.seed)
    elif args.command == "half-close-local":
        coro = check_local_half_close(args.host, args.port, args.size)
    elif args.command == "half-close-remote":
        coro = check_remote_half_close(args.host, args.port, args.size)
    else:
        coro = check_echo(args.host, args.port, args.count, args.size, args.open_batch)
    result = asyncio.run(with_deadline(coro, args.timeout))
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

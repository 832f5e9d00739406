"""TCP test servers and the clients that check them; a standalone script (standard library only).

It is copied into the test network's directory and run there with /usr/bin/python3: as root
on the target (servers) and as the test user on the client host (checks). Servers:

  echo: sends back every byte it receives, until EOF.
  bulk: reads one header line, then
        "UP n"        -> reads n bytes, answers the sha256 hex of them and a newline;
        "DOWN n seed" -> sends n bytes of pattern(seed), then closes.

Each check prints one JSON line ({"ok": ..., ...}) and exits 0 only if everything matched.
"""

import argparse
import asyncio
import hashlib
import json
import resource
import signal
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


async def handle_bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        words = (await reader.readline())[:MAX_HEADER].decode(errors="replace").split()
        if len(words) == 2 and words[0] == "UP" and words[1].isdigit():
            await bulk_up(reader, writer, min(int(words[1]), MAX_BYTES))
        elif len(words) == 3 and words[0] == "DOWN" and words[1].isdigit():
            await bulk_down(writer, min(int(words[1]), MAX_BYTES), words[2])
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


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tcptool", description="TCP test servers and checks")
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("serve", help="run a server until SIGTERM")
    server.add_argument("kind", choices=["echo", "bulk"])
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
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    raise_fd_limit()
    if args.command == "serve":
        asyncio.run(serve(args.kind, args.host, args.port))
        return 0
    if args.command == "up":
        coro = check_up(args.host, args.port, args.size, args.seed)
    elif args.command == "down":
        coro = check_down(args.host, args.port, args.size, args.seed)
    else:
        coro = check_echo(args.host, args.port, args.count, args.size, args.open_batch)
    result = asyncio.run(with_deadline(coro, args.timeout))
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The rootless proxies beside `ssh -D`: shuttle-client --socks (no SUBNET, no firewalld)
and ssh -N -D, each as the test user on the test network, measured through SOCKS5 by the
same small client.

Run as root from the repository root (`make bench` does, after bench and bench.rules):

    .venv/bin/python -m bench.proxies [--quick] [--json=PATH]

  bulk   bytes down and up through one SOCKS connection to testbed's bulk server (MB/s)
  rtt    1-byte round trips through one SOCKS connection to testbed's echo server (median us)
  conns  1,000 simultaneous SOCKS connections, each echoing once (seconds for all)

It prints a table with shuttle's ratio to ssh -D. Every wait is bounded; all traffic stays
inside the namespaces. It reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench.__main__ import raise_fd_limit
from testbed.config import BULK_PORT, ECHO_PORT, S_ADDR_C, SYSTEM_PYTHON, T_ADDR
from testbed.procs import Proc, wait_until
from testbed.shuttle import Shuttle
from testbed.topology import Topology
from testbed.venv import UserVenv

SOCKS_PORT = 10900
START_TIMEOUT = 30.0
FULL = {"bulk_bytes": 500 * 1024 * 1024, "rtt_count": 2000, "conns": 1000}
QUICK = {"bulk_bytes": 20 * 1024 * 1024, "rtt_count": 200, "conns": 100}

# The SOCKS5 client that measures (standard library only), run in C as the test user; it
# prints one JSON object. Every socket has a timeout; every loop is bounded by a count.
PROBE = r"""
import asyncio, hashlib, json, socket, statistics, sys, time
proxy_port, host, case = int(sys.argv[1]), sys.argv[2], sys.argv[3]
TIMEOUT = 60

def request(port):
    return b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big")

def recv_exactly(conn, size):
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data

def connect(port):
    conn = socket.create_connection(("127.0.0.1", proxy_port), timeout=TIMEOUT)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.sendall(request(port))
    answer = recv_exactly(conn, 12)
    if answer[:2] != b"\x05\x00" or answer[3] != 0:
        raise ConnectionError(f"SOCKS answer {answer!r}")
    return conn

def bulk(size):
    conn = connect(int(sys.argv[4]))
    started = time.monotonic()
    conn.sendall(f"DOWN {size} s\n".encode())
    got = 0
    while got < size:
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        got += len(chunk)
    down = got / (time.monotonic() - started) / 1e6
    conn.close()
    conn = connect(int(sys.argv[4]))
    block = bytes(1 << 20)
    started = time.monotonic()
    conn.sendall(f"UP {size}\n".encode())
    digest = hashlib.sha256()
    for offset in range(0, size, len(block)):
        piece = block[: size - offset]
        conn.sendall(piece)
        digest.update(piece)
    answer = conn.recv(100).strip().decode()
    up = size / (time.monotonic() - started) / 1e6
    conn.close()
    ok = got == size and answer == digest.hexdigest()
    return {"down_MBps": round(down, 1), "up_MBps": round(up, 1), "ok": ok}

def rtt(count):
    conn = connect(int(sys.argv[4]))
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        conn.sendall(b"x")
        recv_exactly(conn, 1)
        samples.append((time.perf_counter() - started) * 1e6)
    conn.close()
    return {"median_us": round(statistics.median(samples)), "count": count}

async def conns(count):
    async def one():
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
        try:
            writer.write(request(int(sys.argv[4])))
            if (await reader.readexactly(12))[1] != 0:
                return False
            writer.write(b"ping")
            return await reader.readexactly(4) == b"ping"
        finally:
            writer.close()
    started = time.monotonic()
    every = asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    results = await asyncio.wait_for(every, TIMEOUT)
    good = sum(1 for result in results if result is True)
    errors = sorted({repr(r)[:80] for r in results if isinstance(r, BaseException)})[:3]
    seconds = round(time.monotonic() - started, 2)
    return {"seconds": seconds, "good": good, "count": count, "errors": errors}

size = int(sys.argv[5])
if case == "bulk":
    print(json.dumps(bulk(size)))
elif case == "rtt":
    print(json.dumps(rtt(size)))
else:
    print(json.dumps(asyncio.run(conns(size))))
"""


def start_shuttle(topo: Topology, venv: UserVenv) -> Proc:
    """shuttle-client with only --socks; firewalld is not even started."""
    args = Shuttle(topo, venv).client_args(subnets=(), extra=[f"--socks={SOCKS_PORT}"])
    proc = topo.start("shuttle-socks", topo.user_argv(args, topo.user_env([str(venv.bin)])))
    if not proc.wait_for_line("shuttle-client: ready", START_TIMEOUT):
        raise RuntimeError(f"shuttle-client --socks did not start: {proc.output()[-500:]}")
    return proc


def start_ssh_d(topo: Topology) -> Proc:
    argv = ["ssh", *topo.ssh_options(), "-N", "-o", "ExitOnForwardFailure=yes"]
    argv += ["-D", f"127.0.0.1:{SOCKS_PORT}", f"{topo.user.name}@{S_ADDR_C}"]
    proc = topo.start("ssh-D", topo.user_argv(argv))
    if not wait_until(lambda: topo.c.listening(SOCKS_PORT) or not proc.alive(), START_TIMEOUT):
        raise RuntimeError(f"ssh -D did not listen: {proc.output()[-500:]}")
    return proc


def measure(topo: Topology, sizes: dict[str, int]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    cases = (
        ("bulk", BULK_PORT, sizes["bulk_bytes"]),
        ("rtt", ECHO_PORT, sizes["rtt_count"]),
        ("conns", ECHO_PORT, sizes["conns"]),
    )
    for case, port, size in cases:
        argv = [SYSTEM_PYTHON, "-c", PROBE, str(SOCKS_PORT), T_ADDR, case, str(port), str(size)]
        result = topo.run_as_user(argv, timeout=180)
        lines = result.stdout.strip().splitlines()
        try:
            figures[case] = json.loads(lines[-1])
        except (IndexError, ValueError):
            figures[case] = {"failed": (result.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return figures


def table(results: dict[str, dict[str, Any]], count: int) -> str:
    rows = [
        ("bulk down MB/s", "bulk", "down_MBps"),
        ("bulk up MB/s", "bulk", "up_MBps"),
        ("RTT median us", "rtt", "median_us"),
        (f"{count:,} conns: s for all", "conns", "seconds"),
        (f"{count:,} conns: echoed", "conns", "good"),
    ]
    lines = [f"{'':26} {'shuttle --socks':>16} {'ssh -D':>12} {'ratio':>8}"]
    for label, case, key in rows:
        ours = results["shuttle"].get(case, {}).get(key, "failed")
        theirs = results["ssh-D"].get(case, {}).get(key, "failed")
        ratio = (
            f"{ours / theirs:.2f}x"
            if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs
            else "-"
        )
        lines.append(f"{label:26} {ours!s:>16} {theirs!s:>12} {ratio:>8}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.proxies", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench.proxies: must run as root (namespaces, sshd)", file=sys.stderr)
        return 2
    raise_fd_limit()
    sizes = QUICK if args.quick else FULL
    venv = UserVenv.build()
    results: dict[str, dict[str, Any]] = {}
    try:
        with Topology.up() as topo:
            for name in ("shuttle", "ssh-D"):
                print(f"bench.proxies: {name}", file=sys.stderr, flush=True)
                proc = start_shuttle(topo, venv) if name == "shuttle" else start_ssh_d(topo)
                try:
                    results[name] = measure(topo, sizes)
                finally:
                    proc.stop(timeout=10)
    finally:
        venv.remove()
    print(f"\nshuttle-client --socks beside ssh -D{' (--quick)' if args.quick else ''}")
    print(table(results, sizes["conns"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": sizes, "figures": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

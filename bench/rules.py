"""How long shuttle-firewalld takes to install and remove a session's rules, per method.

Run as root from the repository root:

    .venv/bin/python -m bench.rules [--count=N] [--repeat=N] [--json=PATH]

In a throwaway network namespace it starts a real shuttle-firewalld and a listener, then
times OpenSession and CloseSession round trips (request sent to answer received, so the
firewall tool's run and the daemon's checks are all in) for one subnet, N excluded /32s and
N included /32s, with the nft and the nat method. It prints a table (medians over the
repeats) and checks that nothing is left after each close. It reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import zmq
from shuttle_local.netns import enter_named
from shuttle_protocol.firewall_messages import (
    ALL_PORTS,
    PAIRS,
    CloseSessionAnswer,
    CloseSessionRequest,
    OpenSessionAnswer,
    OpenSessionRequest,
    Target,
)
from shuttle_protocol.rpc import AnswerError, Caller
from shuttle_protocol.schema import Message

FIREWALLD = str(Path(sys.executable).parent / "shuttle-firewalld")
PORT = 12300
START_TIMEOUT = 20.0
ANSWER_TIMEOUT = 120.0  # an answer slower than this is a failure, not a figure
LISTENER = """\
import socket, sys
sockets = []
for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    sock = socket.socket(family)
    sock.bind((address, int(sys.argv[1])))
    sock.listen()
    sockets.append(sock)
print("ready", flush=True)
sys.stdin.read()
"""


@dataclass
class Row:
    method: str
    case: str
    open_ms: float
    close_ms: float
    installed: int  # nft: set elements; nat: rules in our chains
    left: int  # what remained after close: tables or rules (0 is right)


def hosts(count: int) -> tuple[Target, ...]:
    """count /32s that are not neighbours (no two merge into one nft element)."""
    return tuple((f"10.{i // 250 % 256}.{i % 250}.1/32", *ALL_PORTS) for i in range(count))


def cases(count: int) -> list[tuple[str, tuple[Target, ...], tuple[Target, ...]]]:
    everything = (("10.0.0.0/8", *ALL_PORTS),)
    return [
        ("1 subnet", everything, ()),
        (f"{count:,} excluded /32", everything, hosts(count)),
        (f"{count:,} included /32", hosts(count), (("10.1.2.0/24", *ALL_PORTS),)),
    ]


def netns_run(netns: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def installed(netns: str, method: str) -> tuple[int, int]:
    """(nft tables or nat chains of ours, nft set elements or nat rules in them)."""
    if method == "nft":
        listing = json.loads(netns_run(netns, "nft", "-j", "list", "ruleset"))["nftables"]
        tables = [item for item in listing if "table" in item]
        ours = [t["table"]["name"] for t in tables if t["table"]["name"].startswith("shuttle-")]
        elements = sum(
            len(item["set"].get("elem", []))
            for item in listing
            if "set" in item and item["set"]["table"] in ours
        )
        return len(ours), elements
    chains = rules = 0
    for tool in ("iptables-save", "ip6tables-save"):
        for line in netns_run(netns, tool, "-t", "nat").splitlines():
            chains += line.startswith(":SHUTTLE-")
            rules += line.startswith("-A SHUTTLE-")
    return chains, rules


@contextmanager
def namespace() -> Iterator[str]:
    name = f"shuttle-bench-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


@contextmanager
def directory() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="shuttle-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def process(argv: list[str], ready: str, stream: str) -> Iterator[subprocess.Popen[str]]:
    """A process that says `ready` on stream ("stdout" or "stderr") once it is; stopped at the
    end (SIGTERM, then SIGKILL), whatever happens."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
        stderr=subprocess.PIPE if stream == "stderr" else None,
        text=True,
    )
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        out = proc.stdout if stream == "stdout" else proc.stderr
        for line in out or ():
            lines.append(line.rstrip("\n"))
            if ready in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not seen.wait(START_TIMEOUT):
            raise RuntimeError(f"{argv[-1]!r:.60} did not start:\n" + "\n".join(lines))
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(START_TIMEOUT)
        if proc.stdin is not None:
            proc.stdin.close()
        reader.join(START_TIMEOUT)


class Client:
    """One DEALER on firewalld's socket; request() is a timed round trip."""

    def __init__(self, path: Path) -> None:
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.linger = 0
        self._socket.connect(f"ipc://{path}")
        self._caller = Caller(PAIRS)

    def request(self, message: Message) -> tuple[float, Message]:
        call = self._caller.call(message, PAIRS.answer_type(message))
        started = time.perf_counter()
        self._socket.send(call.frame())
        if not self._socket.poll(int(ANSWER_TIMEOUT * 1000)):
            raise RuntimeError(f"no answer to {type(message).__name__} in {ANSWER_TIMEOUT:g} s")
        data = self._socket.recv()
        elapsed = time.perf_counter() - started
        try:
            answer = call.receive(data)
        except AnswerError as exc:
            raise RuntimeError(exc.from_peer("firewalld")) from None
        if answer is None:  # one request at a time on this socket: no other is answered
            raise RuntimeError("firewalld answered another request")
        return elapsed, answer

    def close(self) -> None:
        self._socket.close()
        self._context.term()


def measure(client: Client, netns: str, method: str, count: int, repeat: int) -> list[Row]:
    rows = []
    for case, subnets, excludes in cases(count):
        opens, closes = [], []
        counted, left = 0, 0
        for _ in range(repeat):
            request = OpenSessionRequest(
                method, PORT, subnets, excludes, os.getuid(), -1, False, ()
            )
            took, answer = client.request(request)
            if not isinstance(answer, OpenSessionAnswer) or answer.method != method:
                raise RuntimeError(f"firewalld answered {answer!r:.300}")
            opens.append(took)
            counted = installed(netns, method)[1]
            took, answer = client.request(CloseSessionRequest(answer.session))
            if not isinstance(answer, CloseSessionAnswer):
                raise RuntimeError(f"firewalld answered {answer!r:.300}")
            closes.append(took)
            left = max(left, installed(netns, method)[0])
        rows.append(
            Row(
                method,
                case,
                round(statistics.median(opens) * 1000, 1),
                round(statistics.median(closes) * 1000, 1),
                counted,
                left,
            )
        )
        print(f"  {method} {case}: done", file=sys.stderr, flush=True)
    return rows


def table(rows: list[Row]) -> str:
    head = f"{'method':6}  {'case':22}  {'open ms':>9}  {'close ms':>9}  {'installed':>9}  left"
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(
            f"{row.method:6}  {row.case:22}  {row.open_ms:9.1f}  {row.close_ms:9.1f}  "
            f"{row.installed:9d}  {row.left}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rules", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--count", type=int, default=10_000, help="subnets in the big cases")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench.rules: must run as root (namespaces, firewall rules)", file=sys.stderr)
        return 2
    if not 1 <= args.count <= 50_000 or not 1 <= args.repeat <= 100:
        print("bench.rules: --count must be in [1, 50000], --repeat in [1, 100]", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        netns = stack.enter_context(namespace())
        workdir = stack.enter_context(directory())
        socket_path = workdir / "firewalld.sock"
        stack.enter_context(
            process(
                ["ip", "netns", "exec", netns, FIREWALLD, f"--socket={socket_path}",
                 "--group=root", "--lease=600", f"--policy={workdir}/none.policy"],
                "listening on ipc://",
                "stderr",
            )
        )  # fmt: skip
        stack.enter_context(
            process(
                ["ip", "netns", "exec", netns, sys.executable, "-c", LISTENER, str(PORT)],
                "ready",
                "stdout",
            )
        )
        # firewalld checks the port and puts the rules in its caller's network namespace:
        # the requests must come from inside the throwaway one, not from the host's.
        enter_named(netns, "bench.rules")
        client = Client(socket_path)
        stack.callback(client.close)
        rows = [
            row
            for method in ("nft", "nat")
            for row in measure(client, netns, method, args.count, args.repeat)
        ]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

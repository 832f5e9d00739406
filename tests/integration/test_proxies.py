"""The rootless proxies in the test network: a client with --socks and --http-proxy and no
SUBNET, as a plain user with no firewalld running at all, used by real clients (curl,
git over http_proxy, a UDP ASSOCIATE exchange) and refused to another user; how a refused
target is answered on ssh's fast path and, from a server that forbids forwarding, on the
agent's; and one client that captures a subnet and serves both proxies through the same
tunnel, its proxied connections listed as ssh's."""

from __future__ import annotations

import re
import subprocess
from typing import List, Sequence, Tuple

import pytest

from testbed import (
    CLOSED_PORT,
    ECHO_PORT,
    HTTP_PORT,
    SYSTEM_PYTHON,
    T_ADDR,
    UDP_ECHO_PORT,
    Proc,
    Shuttle,
    Topology,
    ready_line,
)
from testbed.config import T_ADDR6
from testbed.procs import wait_until
from testbed.user import LocalUser
from testbed.venv import UserVenv

from .ctl import ctl_json

pytestmark = pytest.mark.integration

SOCKS = 10800
HTTP_PROXY = 10801
NAME = "target.shuttle.test"  # only S's /etc/hosts knows it
TIMEOUT = 20

# A SOCKS5 client (the standard library only), run in C as the test user: UDP ASSOCIATE,
# then one datagram to each echo address given, resent a few times (UDP may drop); then,
# with "hold", a CONNECT to the first one's host, echo port, kept open (a minute at most:
# the test stops it sooner) for ctl to list.
CLIENT = r"""
import socket, sys, time
port = int(sys.argv[1])

def address(host, number):
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        kind = b"\x04" if len(packed) == 16 else b"\x01"
    except OSError:
        packed = bytes([len(host)]) + host.encode()
        kind = b"\x03"
    return kind + packed + number.to_bytes(2, "big")

def negotiate(command, host, number):
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(b"\x05\x01\x00")
    assert conn.recv(2) == b"\x05\x00"
    conn.sendall(b"\x05" + bytes([command]) + b"\x00" + address(host, number))
    reply = conn.recv(4)
    assert reply[1] == 0, reply
    size = {1: 4, 4: 16}[reply[3]]
    rest = conn.recv(size + 2)
    family = socket.AF_INET if size == 4 else socket.AF_INET6
    return conn, socket.inet_ntop(family, rest[:size]), int.from_bytes(rest[size:], "big")

control, relay_host, relay_port = negotiate(3, "0.0.0.0", 0)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(2)
for target in sys.argv[3:]:
    host, _, number = target.rpartition(":")
    header = b"\0\0\0" + address(host, int(number))
    for attempt in range(5):
        udp.sendto(header + b"ping", (relay_host, relay_port))
        try:
            answer = udp.recv(65535)
        except socket.timeout:
            continue
        print("echo", target, answer == header + b"ping", flush=True)
        break
    else:
        print("no echo", target, flush=True)
if sys.argv[2] == "hold":
    conn, _, _ = negotiate(1, sys.argv[3].rpartition(":")[0], 7007)
    conn.sendall(b"hello")
    print("connected", conn.recv(5) == b"hello", flush=True)
    time.sleep(60)
"""


# A CONNECT through a proxy (the standard library only): argv kind (socks or http), proxy
# port, host, port, then "hold" or "read". Prints the answer's code (SOCKS5's REP, HTTP's
# status); then with "hold", an echo of "hello" and "connected True", kept open (a minute at
# most: the test stops it sooner) for ctl to list; with "read", what came next: "data",
# "eof" or "reset".
PROBE = r"""
import socket, sys, time
kind, port, host, number, then = sys.argv[1:]
conn = socket.create_connection(("127.0.0.1", int(port)), timeout=10)
if kind == "socks":
    conn.sendall(b"\x05\x01\x00")
    assert conn.recv(2) == b"\x05\x00"
    try:
        address = b"\x01" + socket.inet_aton(host)
    except OSError:
        address = b"\x03" + bytes([len(host)]) + host.encode()
    conn.sendall(b"\x05\x01\x00" + address + int(number).to_bytes(2, "big"))
    print("answer", conn.recv(10)[1], flush=True)  # bound to 0.0.0.0:0: 10 bytes
else:
    conn.sendall(f"CONNECT {host}:{number} HTTP/1.1\r\nHost: {host}:{number}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n") and len(head) < 4096:
        byte = conn.recv(1)
        if not byte:
            break
        head += byte
    print("answer", head.split(b" ")[1].decode(), flush=True)
if then == "hold":
    conn.sendall(b"hello")
    print("connected", conn.recv(5) == b"hello", flush=True)
    time.sleep(60)
else:
    try:
        print("data" if conn.recv(65536) else "eof", flush=True)
    except ConnectionResetError:
        print("reset", flush=True)
"""
# The first user's association: UDP ASSOCIATE, its relay's port printed, then (once the
# file argv[2] exists, within 30 s) one echo through it from its own socket.
ASSOCIATION = r"""
import os, socket, sys, time
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
conn.sendall(b"\x05\x01\x00")
assert conn.recv(2) == b"\x05\x00"
conn.sendall(b"\x05\x03\x00\x01" + bytes(6))
reply = conn.recv(10)
assert reply[1] == 0, reply
relay = int.from_bytes(reply[8:10], "big")
print("relay", relay, flush=True)
for _ in range(300):
    if os.path.exists(sys.argv[2]):
        break
    time.sleep(0.1)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(2)
header = b"\0\0\0\x01" + socket.inet_aton(sys.argv[3]) + int(sys.argv[4]).to_bytes(2, "big")
for _ in range(5):
    udp.sendto(header + b"mine", ("127.0.0.1", relay))
    try:
        print("echo", udp.recv(65535) == header + b"mine", flush=True)
        break
    except socket.timeout:
        pass
else:
    print("no echo", flush=True)
"""
# Another user's datagrams into that association: prints whether any answer came back.
INJECT = r"""
import socket, sys
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(1)
header = b"\0\0\0\x01" + socket.inet_aton(sys.argv[2]) + int(sys.argv[3]).to_bytes(2, "big")
for _ in range(3):
    udp.sendto(header + b"theirs", ("127.0.0.1", int(sys.argv[1])))
    try:
        udp.recv(65535)
        print("answered", flush=True)
        break
    except socket.timeout:
        pass
else:
    print("nothing", flush=True)
"""


def run(topo: Topology, argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    result = topo.run_as_user(
        [*(["env", *(f"{k}={v}" for k, v in env.items())] if env else []), *argv], timeout=60
    )
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
    return result.stdout


def curl(*args: str) -> List[str]:
    return ["curl", "-sS", "-g", "--max-time", str(TIMEOUT), *args]


def git_repo(topo: Topology) -> str:
    """A bare repository under T's web root, served as git's dumb HTTP; its URL."""
    work = topo.www_dir / "work"
    bare = topo.www_dir / "repo.git"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    (work / "README").write_text(topo.marker + "\n")
    subprocess.run([*git, "-C", str(work), "add", "README"], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", "one"], check=True)
    subprocess.run([*git, "clone", "-q", "--bare", str(work), str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True)
    return f"http://{T_ADDR}:{HTTP_PORT}/repo.git"


def proxies_alone(
    topo: Topology, user_venv: UserVenv, path: str, *extra: str
) -> Tuple[Shuttle, Proc]:
    """A client with both proxies and no SUBNET (firewalld is never started), whose ready
    line says TCP goes through path (ssh or agent); extra: more of its options."""
    shuttle = Shuttle(topo, user_venv)
    client = shuttle.start_client(
        subnets=(), extra=[f"--socks={SOCKS}", f"--http-proxy={HTTP_PROXY}", *extra]
    )
    assert f"TCP through {path}" in ready_line(client), shuttle.outputs()
    return shuttle, client


def probe(topo: Topology, kind: str, host: str, port: int) -> List[str]:
    """PROBE's CONNECT through the socks or http proxy: the answer, then what came next."""
    proxy = SOCKS if kind == "socks" else HTTP_PROXY
    argv = [SYSTEM_PYTHON, "-c", PROBE, kind, str(proxy), host, str(port), "read"]
    return run(topo, argv).split()


def hold(topo: Topology, kind: str, host: str) -> None:
    """PROBE's CONNECT to host's echo port, held open until the test ends."""
    proxy = SOCKS if kind == "socks" else HTTP_PROXY
    argv = [SYSTEM_PYTHON, "-c", PROBE, kind, str(proxy), host, str(ECHO_PORT), "hold"]
    holder = topo.start(f"{kind}-holder", topo.user_argv(argv, topo.user_env([])))
    assert holder.wait_for_line("connected True", TIMEOUT), holder.output()


def test_proxies_alone_as_a_plain_user_without_firewalld(
    topo: Topology, user_venv: UserVenv, second_user: LocalUser
) -> None:
    shuttle, client = proxies_alone(topo, user_venv, "ssh")
    line = ready_line(client)
    assert f"socks5 on 127.0.0.1:{SOCKS}" in line and "no capture" in line, line
    socks = f"127.0.0.1:{SOCKS}"
    page = run(topo, curl("--socks5-hostname", socks, f"http://{NAME}:{HTTP_PORT}/"))
    assert topo.marker in page
    page = run(topo, curl("--socks5", socks, f"http://[{T_ADDR6}]:{HTTP_PORT}/"))
    assert topo.marker in page
    proxy = f"http://127.0.0.1:{HTTP_PROXY}"
    assert topo.marker in run(topo, curl("-x", proxy, f"http://{NAME}:{HTTP_PORT}/"))
    assert topo.marker in run(topo, curl("-p", "-x", proxy, f"http://{T_ADDR}:{HTTP_PORT}/"))
    url = git_repo(topo)
    clone = topo.home().dir / "clone"
    run(
        topo,
        ["git", "clone", "-q", url, str(clone)],
        env={"http_proxy": proxy, "HOME": str(topo.home().dir)},
    )
    assert (clone / "README").read_text().strip() == topo.marker
    echoes = [f"{T_ADDR}:{UDP_ECHO_PORT}", f"{T_ADDR6}:{UDP_ECHO_PORT}"]
    out = run(topo, [SYSTEM_PYTHON, "-c", CLIENT, str(SOCKS), "once", *echoes])
    assert out.split("\n")[:2] == [f"echo {target} True" for target in echoes], out
    # No --socks-auth: the proxy is the first user's alone.
    other = topo.run_as_user(
        curl("--socks5-hostname", socks, f"http://{NAME}:{HTTP_PORT}/"), user=second_user
    )
    assert other.returncode != 0 and topo.marker not in other.stdout, other.stdout
    assert "connection(s) of other users" in client.output(), shuttle.outputs()
    assert "Traceback" not in client.output(), shuttle.outputs()


def test_refused_targets_are_reset_after_success_over_ssh_and_others_cannot_join_a_udp_flow(
    topo: Topology, user_venv: UserVenv, second_user: LocalUser
) -> None:
    shuttle, client = proxies_alone(topo, user_venv, "ssh", "--tcp-cap=1")
    # Nothing listens on T's CLOSED_PORT. ssh's fast path answers "succeeded" before the
    # hand-over (as ssh -D does); ssh's open fails, the agent's too, and the program sees a
    # reset after REP 0 / 200.
    assert probe(topo, "socks", T_ADDR, CLOSED_PORT) == ["answer", "0", "reset"]
    assert probe(topo, "http", T_ADDR, CLOSED_PORT) == ["answer", "200", "reset"]
    # With the master at its cap (one held connection), the agent's path answers instead,
    # with the outcome's code.
    hold(topo, "socks", T_ADDR)

    def carried() -> bool:
        listed = ctl_json(shuttle, "connections")["connections"]
        return any(c["proto"] == "tcp-ssh" for c in listed)

    assert wait_until(carried, TIMEOUT), shuttle.outputs()
    assert probe(topo, "socks", T_ADDR, CLOSED_PORT) == ["answer", "5", "eof"]
    # An association of the first user; the second one sends into it first, from the same
    # address (loopback), and gets nothing back; the first user's own echo still works.
    go = topo.home().dir / "go"
    holder = topo.start(
        "association",
        topo.user_argv(
            [SYSTEM_PYTHON, "-c", ASSOCIATION, str(SOCKS), str(go), T_ADDR, str(UDP_ECHO_PORT)],
            topo.user_env([]),
        ),
    )
    assert holder.wait_for_line("relay ", TIMEOUT), holder.output()
    relay = holder.output().split("relay ", 1)[1].split()[0]
    inject = [SYSTEM_PYTHON, "-c", INJECT, relay, T_ADDR, str(UDP_ECHO_PORT)]
    other = topo.run_as_user(inject, user=second_user, timeout=30)
    assert other.stdout.split() == ["nothing"], other
    go.write_text("")
    assert holder.wait_for_line("echo True", TIMEOUT), holder.output()
    assert "datagram(s) from other users' sockets" in client.output(), shuttle.outputs()
    assert "Traceback" not in client.output(), shuttle.outputs()


def test_without_the_fast_path_a_refused_target_gets_its_error(
    topo: Topology, user_venv: UserVenv
) -> None:
    topo.start_sshd(tcp_forwarding=False)
    shuttle, client = proxies_alone(topo, user_venv, "agent")
    # The answer waits for the agent's connect: RFC 1928's "connection refused", then a
    # close; HTTP's 502, with a body that says why; "host unreachable" for a name S cannot
    # resolve.
    assert probe(topo, "socks", T_ADDR, CLOSED_PORT) == ["answer", "5", "eof"]
    assert probe(topo, "http", T_ADDR, CLOSED_PORT) == ["answer", "502", "data"]
    assert probe(topo, "socks", "nowhere.shuttle.test", ECHO_PORT) == ["answer", "4", "eof"]
    hold(topo, "socks", T_ADDR)
    listed = ctl_json(shuttle, "connections")["connections"]
    assert ("tcp", T_ADDR, ECHO_PORT) in {(c["proto"], c["host"], c["port"]) for c in listed}
    assert "Traceback" not in client.output(), shuttle.outputs()


def test_one_client_captures_and_serves_both_proxies(shuttle: Shuttle) -> None:
    client = shuttle.start_client(extra=[f"--socks={SOCKS}", f"--http-proxy={HTTP_PROXY}"])
    assert "TCP through ssh" in ready_line(client), shuttle.outputs()
    assert re.search(r"proxies: socks5 on 127\.0\.0\.1:\d+, http proxy", client.output())
    topo = shuttle.topo
    assert topo.marker in topo.curl(T_ADDR, HTTP_PORT, max_time=TIMEOUT).stdout  # captured
    page = run(topo, curl("--socks5-hostname", f"127.0.0.1:{SOCKS}", f"http://{NAME}:{HTTP_PORT}/"))
    assert topo.marker in page
    holder = topo.start(
        "socks-holder",
        topo.user_argv(
            [SYSTEM_PYTHON, "-c", CLIENT, str(SOCKS), "hold", f"{T_ADDR}:{UDP_ECHO_PORT}"],
            topo.user_env([]),
        ),
    )
    assert holder.wait_for_line("connected True", TIMEOUT), holder.output()
    hold(topo, "http", NAME)
    listed = ctl_json(shuttle, "connections")["connections"]
    by_proto = {(c["proto"], c["host"], c["port"]) for c in listed}
    # ssh's fast path, as a captured connection takes: a name too (sshd resolves it).
    assert ("tcp-ssh", T_ADDR, ECHO_PORT) in by_proto, listed
    assert ("tcp-ssh", NAME, ECHO_PORT) in by_proto, listed
    assert ("udp", T_ADDR, UDP_ECHO_PORT) in by_proto, listed  # its association's flow

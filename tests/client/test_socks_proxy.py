"""A real shuttle-client running only its proxies (no SUBNET), with a real agent behind the
stand-in for ssh (conftest's fake_ssh): curl through --socks and --http-proxy, a UDP
ASSOCIATE exchange over IPv4 and IPv6, `ctl connections`, bad clients, and proof that
firewalld is never asked (a listener on its socket's path sees no one). One client serves
the module."""

import json
import re
import select
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, Sequence, Tuple

import pytest
from shuttle_client.proxies import socks5

READY = re.compile(r"ready: socks5 on 127\.0\.0\.1:(\d+), http proxy on \[::1\]:(\d+)")
WAIT = 20.0
MARKER = "proxied-page-marker"


class Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{MARKER} {self.path} {self.headers.get('Connection')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class Dual(ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def udp_echo(host: str) -> Tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))

    def echo() -> None:
        while True:
            try:
                data, peer = sock.recvfrom(65535)
                sock.sendto(b"echo:" + data, peer)
            except OSError:
                return

    threading.Thread(target=echo, daemon=True).start()
    return sock, sock.getsockname()[1]


FAKE_SSH = '#!/bin/sh\nwhile [ "$1" != "--" ]; do shift; done\nshift 2\nexec sh -c "$1"\n'


def start_client(tmp: Path, ready: "re.Pattern[str]", *options: str) -> Tuple[Any, "re.Match[str]"]:
    """shuttle-client with options, behind the stand-in ssh; it and its ready line's match."""
    fake = tmp / "fake-ssh"
    fake.write_text(FAKE_SSH)
    fake.chmod(0o755)
    argv = [sys.executable, "-c", "from shuttle_client.main import main; main()"]
    argv += ["-r", "server", "-e", str(fake), "--tcp=agent", *options]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:  # bounded: EOF or the deadline
        if not select.select([proc.stderr], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = ready.search(line)
        if match:
            return proc, match
    stop(proc)
    raise AssertionError("no ready line:\n" + "".join(lines))


def stop(proc: Any) -> None:
    proc.terminate()
    proc.wait(timeout=WAIT)
    proc.stderr.close()


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("proxies")
    web = Dual(("::", 0), Page)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    echo4, echo4_port = udp_echo("127.0.0.1")
    echo6, echo6_port = udp_echo("::1")
    control = str(tmp / "control.sock")
    # A listener where firewalld's socket would be: it must never see a connection.
    firewalld = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    firewalld.bind(str(tmp / "firewalld.sock"))
    firewalld.listen(8)
    firewalld.setblocking(False)
    try:
        proc, match = start_client(
            tmp,
            READY,
            "--socks=127.0.0.1:0",
            "--http-proxy=[::1]:0",
            f"--firewalld={tmp}/firewalld.sock",
            f"--control={control}",
        )
        try:
            yield {
                "tmp": tmp,
                "socks": int(match.group(1)),
                "http": int(match.group(2)),
                "web": web.server_address[1],
                "echo4": echo4_port,
                "echo6": echo6_port,
                "control": control,
                "proc": proc,
                "firewalld": firewalld,
            }
        finally:
            stop(proc)
    finally:
        web.shutdown()
        web.server_close()
        firewalld.close()
        echo4.close()
        echo6.close()


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def curl(*args: str, who: Sequence[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*who, "curl", "-sS", "--max-time", "10", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def ctl(proxies: Dict[str, Any], what: str) -> Any:
    argv = [sys.executable, "-c", "from shuttle_client.main import main; main()", "ctl"]
    result = subprocess.run(
        [*argv, f"--control={proxies['control']}", "--json", what],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_socks5_hostname_resolved_by_the_agent(proxies: Dict[str, Any]) -> None:
    page = curl(
        "--socks5-hostname", f"127.0.0.1:{proxies['socks']}", f"http://localhost:{proxies['web']}/a"
    )
    assert page.returncode == 0 and f"{MARKER} /a" in page.stdout, page.stderr


def test_socks5_with_an_ipv6_address(proxies: Dict[str, Any]) -> None:
    page = curl("--socks5", f"127.0.0.1:{proxies['socks']}", f"http://[::1]:{proxies['web']}/b")
    assert page.returncode == 0 and f"{MARKER} /b" in page.stdout, page.stderr


def test_http_connect_and_absolute_uri(proxies: Dict[str, Any]) -> None:
    proxy = f"http://[::1]:{proxies['http']}"
    tunnelled = curl("-p", "-x", proxy, f"http://127.0.0.1:{proxies['web']}/c")
    assert tunnelled.returncode == 0 and f"{MARKER} /c" in tunnelled.stdout, tunnelled.stderr
    forwarded = curl("-x", proxy, f"http://localhost:{proxies['web']}/d?x=1")
    assert forwarded.returncode == 0, forwarded.stderr
    assert f"{MARKER} /d?x=1 close" in forwarded.stdout  # origin-form, one request


def test_refused_target_is_a_failed_connection(proxies: Dict[str, Any]) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connecting is refused
        port = closed.getsockname()[1]
        page = curl(
            "--socks5-hostname", f"127.0.0.1:{proxies['socks']}", f"http://localhost:{port}/"
        )
    assert page.returncode != 0


def negotiate(port: int, command: int, host: str, target_port: int) -> Tuple[socket.socket, bytes]:
    conn = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    conn.sendall(b"\x05\x01\x00")
    assert conn.recv(2) == b"\x05\x00"
    conn.sendall(b"\x05" + bytes((command,)) + b"\x00" + socks5.encode_address(host, target_port))
    reply = b""
    while len(reply) < 4 or len(reply) < socks5.decode_address(reply, 3)[2]:  # type: ignore[index]
        chunk = conn.recv(64)
        assert chunk, f"closed after {reply!r}"
        reply += chunk
    return conn, reply


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_udp_associate_echo(proxies: Dict[str, Any], family: str) -> None:
    target = ("127.0.0.1", proxies["echo4"]) if family == "ipv4" else ("::1", proxies["echo6"])
    conn, reply = negotiate(proxies["socks"], socks5.UDP_ASSOCIATE, "0.0.0.0", 0)
    with conn, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert reply[1] == socks5.SUCCEEDED
        relay_host, relay_port, _ = socks5.decode_address(reply, 3)  # type: ignore[misc]
        header = b"\0\0\0" + socks5.encode_address(*target)
        udp.settimeout(2)
        answer = b""
        for attempt in range(5):  # UDP may drop: a few tries, each bounded by the timeout
            udp.sendto(header + b"ping%d" % attempt, (relay_host, relay_port))
            try:
                answer = udp.recv(65535)
                break
            except socket.timeout:
                continue
        assert answer.startswith(header + b"echo:ping"), answer
        flows = [c for c in ctl(proxies, "connections")["connections"] if c["proto"] == "udp"]
        assert any(c["port"] == target[1] for c in flows), flows


def test_open_connection_is_listed(proxies: Dict[str, Any]) -> None:
    conn, reply = negotiate(proxies["socks"], socks5.CONNECT, "localhost", proxies["web"])
    with conn:
        assert reply[1] == socks5.SUCCEEDED
        listed = ctl(proxies, "connections")["connections"]
        assert any(c["host"] == "localhost" and c["port"] == proxies["web"] for c in listed), listed


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x04\x01\x00\x50\x7f\0\0\x01\0",
        b"\x05\x01\x00\x05\x02\x00\x01\0\0\0\0\0\x50",
        b"GET / HTTP/1.1\r\n\r\n",
    ],
    ids=["socks4", "bind", "http-to-socks"],
)
def test_bad_clients_are_turned_away_and_the_proxy_goes_on(
    proxies: Dict[str, Any], garbage: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", proxies["socks"]), timeout=WAIT) as conn:
        conn.sendall(garbage)
        received = b""
        try:
            for _ in range(10):  # bounded: the proxy closes or resets after its answer
                chunk = conn.recv(64)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            pass
    if garbage.startswith(b"\x05"):
        assert received.endswith(b"\x05\x07\x00\x01\0\0\0\0\0\0")  # command not supported
    with socket.create_connection(("::1", proxies["http"]), timeout=WAIT) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert conn.recv(64).startswith(b"HTTP/1.1 400 ")
    assert proxies["proc"].poll() is None
    test_socks5_hostname_resolved_by_the_agent(proxies)


def test_firewalld_was_never_asked(proxies: Dict[str, Any]) -> None:
    assert ctl(proxies, "status")["method"] == ""
    with pytest.raises(BlockingIOError):
        proxies["firewalld"].accept()


def test_username_and_password(proxies: Dict[str, Any]) -> None:
    auth = proxies["tmp"] / "socks-auth"
    auth.write_text("alice:pa:ss\n")
    auth.chmod(0o600)
    ready = re.compile(r"ready: socks5 on \[::1\]:(\d+)")
    proc, match = start_client(
        proxies["tmp"],
        ready,
        "--socks=[::1]:0",
        f"--socks-auth={auth}",
        f"--control={proxies['tmp']}/auth.sock",
    )
    try:
        proxy = f"[::1]:{match.group(1)}"
        url = f"http://localhost:{proxies['web']}/auth"
        page = curl("--socks5-hostname", proxy, "-U", "alice:pa:ss", url)
        assert page.returncode == 0 and f"{MARKER} /auth" in page.stdout, page.stderr
        assert curl("--socks5-hostname", proxy, "-U", "alice:wrong", url).returncode != 0
        assert curl("--socks5-hostname", proxy, url).returncode != 0  # no credentials
        # With the password, another user may use it.
        page = curl("--socks5-hostname", proxy, "-U", "alice:pa:ss", url, who=NOBODY)
        assert page.returncode == 0 and f"{MARKER} /auth" in page.stdout, page.stderr
    finally:
        stop(proc)


def test_without_a_password_other_users_are_turned_away(proxies: Dict[str, Any]) -> None:
    url = f"http://localhost:{proxies['web']}/other"
    socks = curl("--socks5-hostname", f"127.0.0.1:{proxies['socks']}", url, who=NOBODY)
    http = curl("-x", f"http://[::1]:{proxies['http']}", url, who=NOBODY)
    assert socks.returncode != 0 and MARKER not in socks.stdout, socks.stdout
    assert http.returncode != 0 and MARKER not in http.stdout, http.stdout
    test_socks5_hostname_resolved_by_the_agent(proxies)  # its own user still gets in

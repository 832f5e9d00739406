"""ZAP replies: peer credentials from libzmq's address, and the replies given to them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from shuttle_protocol.zap import (
    PID_PROPERTY,
    ZAP_ENDPOINT,
    Peer,
    parse_peer_address,
    zap_reply,
)

DOMAIN = b"shuttle"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory any uid can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="shuttle-zap-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(
    ("address", "peer"),
    [
        (b"localhost:1000:1001:4242", Peer(1000, 1001, 4242)),
        (b":0:0:1", Peer(0, 0, 1)),
        (b"a:b:c:65534:65534:7", Peer(65534, 65534, 7)),  # only the last three count
    ],
)
def test_parse_peer_address(address: bytes, peer: Peer) -> None:
    assert parse_peer_address(address) == peer


@pytest.mark.parametrize(
    "address",
    [
        b"",
        b"localhost",
        b"1:2",
        b"localhost:1000:1000",  # a tcp peer: host and port, no credentials
        b"x:a:b:c",
        b"x:-1:0:1",
        b"x:1:2:3\n",
        b"x:1 :2:3",
        b"x:12345678901:0:1",
        "x:\u0661:2:3".encode(),  # an Arabic-Indic digit is a digit to str, not to bytes
    ],
)
def test_parse_peer_address_refuses(address: bytes) -> None:
    with pytest.raises(ValueError, match="no peer credentials"):
        parse_peer_address(address)


def request(address: bytes, domain: bytes = DOMAIN, mechanism: bytes = b"NULL") -> list[bytes]:
    return [b"1.0", b"7", domain, address, b"", mechanism]


def test_reply_names_the_uid_and_the_pid() -> None:
    assert zap_reply(request(b"localhost:1000:100:42"), DOMAIN) == [
        b"1.0",
        b"7",
        b"200",
        b"OK",
        b"1000",
        b"\x05X-Pid\x00\x00\x00\x0242",  # ZMTP metadata: name and value, each with its length
    ]


def test_admit_refuses_with_its_reason() -> None:
    reply = zap_reply(request(b":1000:100:42"), DOMAIN, lambda peer: f"uid {peer.uid} is not ours")
    assert reply == [b"1.0", b"7", b"400", b"uid 1000 is not ours", b"", b""]


def test_reply_refuses_an_address_without_credentials() -> None:
    assert zap_reply(request(b"127.0.0.1:5555"), DOMAIN)[:3] == [b"1.0", b"7", b"400"]


@pytest.mark.parametrize(
    "frames",
    [
        request(b":1:1:1", domain=b"other"),
        request(b":1:1:1", mechanism=b"PLAIN"),
        [*request(b":1:1:1", mechanism=b"PLAIN"), b"user", b"password"],
    ],
)
def test_reply_refuses_other_domains_and_mechanisms(frames: list[bytes]) -> None:
    reply = zap_reply(frames, DOMAIN)
    assert reply[2] == b"400"
    assert reply[4] == b""


@pytest.mark.parametrize(
    "frames", [[], [b"1.0"], [b"1.0", b"7"], [b"2.0", *request(b":1:1:1")[1:]]]
)
def test_reply_to_malformed_requests(frames: list[bytes]) -> None:
    reply = zap_reply(frames, DOMAIN)
    assert len(reply) == 6
    assert reply[2] == b"500"


CLIENT = (
    "import sys, zmq; c = zmq.Context(); d = c.socket(zmq.DEALER); d.linger = 0;"
    " d.connect(sys.argv[1]); d.send(b'hello'); print(d.recv().decode() if d.poll(10000) else '');"
    " d.close(); c.term()"
)


@pytest.mark.integration
def test_libzmq_hands_the_kernel_uid_to_zap(socket_dir: Path) -> None:
    """The experiment behind the design: a real connection from uid 65534 is seen as 65534."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    endpoint = f"ipc://{socket_dir}/zap.sock"
    context = zmq.Context()
    zap = context.socket(zmq.REP)
    router = context.socket(zmq.ROUTER)
    for sock in (zap, router):
        sock.linger = 0
    client = None
    try:
        zap.bind(ZAP_ENDPOINT)
        router.zap_domain = DOMAIN
        router.bind(endpoint)
        (socket_dir / "zap.sock").chmod(0o777)
        client = subprocess.Popen(
            [*NOBODY, sys.executable, "-c", CLIENT, endpoint], stdout=subprocess.PIPE, text=True
        )
        assert zap.poll(10_000), "libzmq never asked the ZAP handler"
        zap_request = zap.recv_multipart()
        assert parse_peer_address(zap_request[3]).uid == 65534
        zap.send_multipart(zap_reply(zap_request, DOMAIN))
        assert router.poll(10_000), "the request never arrived"
        identity, payload = router.recv_multipart(copy=False)
        assert payload.bytes == b"hello"
        assert payload.get("User-Id") == "65534"
        assert payload.get(PID_PROPERTY) == str(client.pid)  # setpriv execs: the same pid
        router.send_multipart([identity.bytes, b"65534"])
        out, _ = client.communicate(timeout=10)
        assert out.strip() == "65534"
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(10)
        if client is not None and client.stdout is not None:
            client.stdout.close()
        zap.close()
        router.close()
        context.term()

"""Where a reply socket may sit (only where the session captures), and the transparent
sockets themselves: their options, as the kernel reports them back."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator

import pytest
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.transparent import (
    IP_RECVORIGDSTADDR,
    IP_TRANSPARENT,
    IPV6_RECVORIGDSTADDR,
    IPV6_TRANSPARENT,
    is_local,
    listeners,
    reply_problem,
    reply_socket,
)

from .conftest import LOCAL_ADDRESSES, make_target

SUBNETS = [make_target(item) for item in ("198.18.0.0/15", ("fd00:5e::/32", 53, 53))]
EXCLUDES = [make_target(item) for item in ("198.18.0.99/32", ("198.18.1.0/24", 22, 22))]


def problem(address: str, port: int) -> str | None:
    return reply_problem(
        SUBNETS,
        EXCLUDES,
        ipaddress.ip_address(address),
        port,
        lambda address: str(address) in LOCAL_ADDRESSES,
    )


@pytest.mark.parametrize(
    ("address", "port"),
    [("198.18.0.5", 53), ("198.19.255.254", 1), ("198.18.1.7", 23), ("fd00:5e::5", 53)],
)
def test_inside_the_capture(address: str, port: int) -> None:
    assert problem(address, port) is None


@pytest.mark.parametrize(
    ("address", "port", "why"),
    [
        ("192.0.2.1", 53, "192.0.2.1:53 is not inside the session's subnets (or is excluded)"),
        ("198.18.0.99", 53, "198.18.0.99:53 is not inside the session's subnets (or is excluded)"),
        ("198.18.1.7", 22, "198.18.1.7:22 is not inside the session's subnets (or is excluded)"),
        ("fd00:5e::5", 54, "[fd00:5e::5]:54 is not inside the session's subnets (or is excluded)"),
        (
            "2001:db8::1",
            53,
            "[2001:db8::1]:53 is not inside the session's subnets (or is excluded)",
        ),
        ("198.18.0.1", 53, "198.18.0.1:53 is this host's own address, which is never captured"),
        ("fd00:5e::1", 53, "[fd00:5e::1]:53 is this host's own address, which is never captured"),
        ("127.0.0.1", 53, "127.0.0.1:53 is not an address this session captures"),
        ("::1", 53, "[::1]:53 is not an address this session captures"),
        ("0.0.0.0", 53, "0.0.0.0:53 is not an address this session captures"),
        ("224.0.0.251", 5353, "224.0.0.251:5353 is not an address this session captures"),
        ("255.255.255.255", 67, "255.255.255.255:67 is not an address this session captures"),
        (
            "::ffff:198.18.0.5",
            53,
            # Python 3.13 writes it ::ffff:198.18.0.5, older ones in hex.
            f"[{ipaddress.ip_address('::ffff:198.18.0.5')}]:53 is an IPv4-mapped address; "
            "ask for 198.18.0.5 instead",
        ),
    ],
)
def test_outside_the_capture(address: str, port: int, why: str) -> None:
    assert problem(address, port) == why


def test_a_session_capturing_everything_still_keeps_loopback_and_local_addresses() -> None:
    everything = [make_target("0.0.0.0/0"), make_target("::/0")]
    local = lambda address: str(address) in LOCAL_ADDRESSES  # noqa: E731
    for address in ("127.0.0.53", "198.18.0.1", "::1", "fd00:5e::1", "ff02::1"):
        assert reply_problem(everything, [], ipaddress.ip_address(address), 53, local) is not None
    assert reply_problem(everything, [], ipaddress.ip_address("8.8.8.8"), 53, local) is None


def test_is_local_asks_the_routing() -> None:
    assert is_local(ipaddress.ip_address("127.0.0.1"))
    assert not is_local(ipaddress.ip_address("198.51.100.7"))  # TEST-NET-2: never ours


# --- the sockets (need CAP_NET_ADMIN; bound on loopback, nothing sent) ------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="transparent sockets need root")


def option(sock: socket.socket, level: int, name: int) -> int:
    return sock.getsockopt(level, name)


@pytest.fixture
def made() -> Iterator[dict[str, socket.socket]]:
    _port, sockets = listeners({4, 6})
    try:
        yield sockets
    finally:
        for sock in sockets.values():
            sock.close()


@needs_root
def test_listeners_per_version_on_one_loopback_port(made: dict[str, socket.socket]) -> None:
    assert list(made) == ["tcp4", "udp4", "tcp6", "udp6"]
    port = made["tcp4"].getsockname()[1]
    assert [sock.getsockname()[:2] for sock in made.values()] == [
        ("127.0.0.1", port),
        ("127.0.0.1", port),
        ("::1", port),
        ("::1", port),
    ]
    assert option(made["tcp4"], socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    assert option(made["tcp6"], socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


@needs_root
def test_listener_options(made: dict[str, socket.socket]) -> None:
    ip, ipv6, sol = socket.IPPROTO_IP, socket.IPPROTO_IPV6, socket.SOL_SOCKET
    assert option(made["tcp4"], ip, IP_TRANSPARENT) == 1
    assert option(made["udp4"], ip, IP_TRANSPARENT) == 1
    assert option(made["udp4"], ip, IP_RECVORIGDSTADDR) == 1
    assert option(made["tcp6"], ipv6, IPV6_TRANSPARENT) == 1
    assert option(made["udp6"], ipv6, IPV6_TRANSPARENT) == 1
    assert option(made["udp6"], ipv6, IPV6_RECVORIGDSTADDR) == 1
    assert option(made["tcp6"], ipv6, socket.IPV6_V6ONLY) == 1
    assert option(made["udp6"], ipv6, socket.IPV6_V6ONLY) == 1
    # SO_REUSEADDR on TCP only: on UDP anyone could bind beside us and take the traffic.
    assert option(made["tcp4"], sol, socket.SO_REUSEADDR) == 1
    assert option(made["udp4"], sol, socket.SO_REUSEADDR) == 0
    assert option(made["udp6"], sol, socket.SO_REUSEADDR) == 0


@needs_root
def test_reply_socket_is_transparent_and_bound_where_asked() -> None:
    # 198.51.100.7 (TEST-NET-2) is not this host's: only a transparent socket binds there.
    with reply_socket(ipaddress.ip_address("198.51.100.7"), 53) as sock:
        assert sock.getsockname() == ("198.51.100.7", 53)
        assert sock.type == socket.SOCK_DGRAM
        assert option(sock, socket.IPPROTO_IP, IP_TRANSPARENT) == 1
        assert option(sock, socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        # Another flow to the same destination gets a socket beside it.
        with reply_socket(ipaddress.ip_address("198.51.100.7"), 53) as again:
            assert again.getsockname() == ("198.51.100.7", 53)
    with reply_socket(ipaddress.ip_address("2001:db8::7"), 5353) as sock6:
        assert sock6.getsockname()[:2] == ("2001:db8::7", 5353)
        assert option(sock6, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


def test_a_reply_socket_that_cannot_be_bound_is_the_callers_error() -> None:
    # Without CAP_NET_ADMIN IP_TRANSPARENT fails: try it in a child that is not root.
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            reply_socket(ipaddress.ip_address("198.51.100.7"), 53)
        except RequestError as exc:
            status = 0 if "cannot make a reply socket" in str(exc) else 2
        finally:
            os._exit(status)
    assert os.waitpid(pid, 0)[1] == 0

"""Where a reply socket may sit (only where the session captures, at a unicast destination,
for a program on this host), and the transparent sockets themselves: their options, as the
kernel reports them back."""

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
    SO_LOCK_FILTER,
    Flow,
    destination_problem,
    host_addresses,
    is_local,
    listeners,
    program_device,
    reply_problem,
    reply_socket,
    route_type,
)

from .fakes import make_target

SUBNETS = [make_target(item) for item in ("198.18.0.0/15", ("fd00:5e::/32", 53, 53))]
EXCLUDES = [make_target(item) for item in ("198.18.0.99/32", ("198.18.1.0/24", 22, 22))]


def problem(address: str, port: int) -> str | None:
    return reply_problem(SUBNETS, EXCLUDES, ipaddress.ip_address(address), port)


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


def test_a_session_capturing_everything_still_keeps_loopback_and_multicast() -> None:
    everything = [make_target("0.0.0.0/0"), make_target("::/0")]
    for address in ("127.0.0.53", "::1", "ff02::1", "0.0.0.0"):
        assert reply_problem(everything, [], ipaddress.ip_address(address), 53) is not None
    assert reply_problem(everything, [], ipaddress.ip_address("8.8.8.8"), 53) is None


# --- what the routing says of a flow's two ends (as `ip -j` prints it) ------------------------

ROUTE = '[{"dst":"198.18.0.5","dev":"fwt0","prefsrc":"198.18.0.1","flags":[],"uid":0}]'
ADDRESSES = """[
 {"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
 {"ifindex":3,"ifname":"fwt0","addr_info":[
  {"family":"inet","local":"198.18.0.1","prefixlen":15},
  {"family":"inet","local":"192.0.2.1","prefixlen":31},
  {"family":"inet6","local":"fd00:5e::1","prefixlen":32},
  {}, {"local":"junk","prefixlen":3}, {"local":"10.0.0.1","prefixlen":"8"}]},
 {"ifindex":4}, "junk"
]"""
HOST = host_addresses(ADDRESSES)


def flow(destination: str, port: int = 53, program: str = "") -> Flow:
    program = program or ("fd00:5e::1" if ":" in destination else "198.18.0.1")
    return Flow(ipaddress.ip_address(program), 40000, ipaddress.ip_address(destination), port)


def test_route_types_as_ip_prints_them() -> None:
    assert route_type(ROUTE) == "unicast"  # a plain route names no type
    assert route_type(ROUTE.replace('[{"dst"', '[{"type":"broadcast","dst"')) == "broadcast"
    for bad in ("{}", "[]", "[1]", '[{"type":7}]', "nonsense"):
        with pytest.raises(ValueError):
            route_type(bad)


def test_the_hosts_addresses_with_their_devices_and_prefixes() -> None:
    assert [(device, str(item)) for device, item in HOST] == [
        ("lo", "127.0.0.1/8"),
        ("fwt0", "198.18.0.1/15"),
        ("fwt0", "192.0.2.1/31"),
        ("fwt0", "fd00:5e::1/32"),
    ]
    assert host_addresses("") == []
    with pytest.raises(ValueError):
        host_addresses("{}")


@pytest.mark.parametrize(
    ("destination", "kind", "why"),
    [
        ("198.18.0.5", "unicast", None),
        ("192.0.2.0", "unicast", None),  # a /31 has no network address: both ends are hosts
        ("fd00:5e::5", "unicast", None),
        (
            "198.18.0.1",
            "local",
            "198.18.0.1:53 is this host's own address, which is never captured",
        ),
        (
            "fd00:5e::1",
            "local",
            "[fd00:5e::1]:53 is this host's own address, which is never captured",
        ),
        (
            "198.19.255.255",
            "broadcast",
            "198.19.255.255:53 is a broadcast address, not one a reply may come from",
        ),
        (
            "ff02::1",
            "multicast",
            "[ff02::1]:53 is a multicast address, not one a reply may come from",
        ),
        (
            "fd00:5e::",
            "anycast",
            "[fd00:5e::]:53 is a anycast address, not one a reply may come from",
        ),
        # Routed as unicast, yet a whole subnet's: the host's own prefixes say so.
        (
            "198.18.0.0",
            "unicast",
            "198.18.0.0:53 is the network address of 198.18.0.0/15, a subnet of this host",
        ),
        (
            "198.19.255.255",
            "unicast",
            "198.19.255.255:53 is the broadcast address of 198.18.0.0/15, a subnet of this host",
        ),
        (
            "fd00:5e::",
            "unicast",
            "[fd00:5e::]:53 is the network address of fd00:5e::/32, a subnet of this host",
        ),
    ],
)
def test_a_reply_comes_only_from_a_unicast_destination_that_is_not_a_subnets_own(
    destination: str, kind: str, why: str | None
) -> None:
    assert destination_problem(flow(destination), kind, HOST) == why


def test_the_program_is_on_a_device_of_this_host_but_loopback() -> None:
    assert program_device(flow("198.18.0.5"), HOST) == "fwt0"
    assert program_device(flow("fd00:5e::5"), HOST) == "fwt0"
    with pytest.raises(RequestError, match=r"^the program at 127\.0\.0\.1:40000 is on loopback"):
        program_device(flow("198.18.0.5", program="127.0.0.1"), HOST)
    with pytest.raises(RequestError, match=r"^the program at 198\.18\.0\.7:40000 has no address"):
        program_device(flow("198.18.0.5", program="198.18.0.7"), HOST)


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


MARK = 0x53488001


@needs_root
def test_reply_socket_is_transparent_fenced_and_bound_where_asked() -> None:
    # 198.51.100.7 (TEST-NET-2) is not this host's: only a transparent socket binds there.
    with reply_socket(flow("198.51.100.7"), MARK, "lo") as sock:
        assert sock.getsockname() == ("198.51.100.7", 53)
        assert sock.type == socket.SOCK_DGRAM
        assert option(sock, socket.IPPROTO_IP, IP_TRANSPARENT) == 1
        assert option(sock, socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert option(sock, socket.SOL_SOCKET, socket.SO_MARK) == MARK
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0") == b"lo"
        assert option(sock, socket.SOL_SOCKET, SO_LOCK_FILTER) == 1
        # Another flow to the same destination gets a socket beside it.
        with reply_socket(flow("198.51.100.7"), MARK, "lo") as again:
            assert again.getsockname() == ("198.51.100.7", 53)
    with reply_socket(flow("2001:db8::7", 5353), MARK, "lo") as sock6:
        assert sock6.getsockname()[:2] == ("2001:db8::7", 5353)
        assert option(sock6, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert option(sock6, socket.SOL_SOCKET, socket.SO_MARK) == MARK


def test_a_reply_socket_that_cannot_be_bound_is_the_callers_error() -> None:
    # Without CAP_NET_ADMIN IP_TRANSPARENT fails: try it in a child that is not root.
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            reply_socket(flow("198.51.100.7"), MARK, "lo")
        except RequestError as exc:
            status = 0 if "cannot make a reply socket" in str(exc) else 2
        finally:
            os._exit(status)
    assert os.waitpid(pid, 0)[1] == 0

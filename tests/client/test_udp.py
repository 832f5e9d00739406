"""UDP through tproxy: reading a datagram's original destination from its ancillary data."""

import socket
import struct

from shuttle_client.udp import IP_RECVORIGDSTADDR, IPV6_RECVORIGDSTADDR, original_destination


def sockaddr_in(host: str, port: int) -> bytes:
    return struct.pack("!HH4s8x", socket.AF_INET, port, socket.inet_aton(host))


def sockaddr_in6(host: str, port: int) -> bytes:
    return struct.pack(
        "!HHI16sI", socket.AF_INET6, port, 0, socket.inet_pton(socket.AF_INET6, host), 0
    )


def test_ipv4_and_ipv6_destinations() -> None:
    v4 = [(socket.SOL_IP, IP_RECVORIGDSTADDR, sockaddr_in("198.18.2.2", 7009))]
    assert original_destination(v4) == ("198.18.2.2", 7009)
    v6 = [(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, sockaddr_in6("fd00:5e:2::2", 53))]
    assert original_destination(v6) == ("fd00:5e:2::2", 53)


def test_other_or_short_ancillary_data_is_no_destination() -> None:
    assert original_destination([]) is None
    assert original_destination([(socket.SOL_SOCKET, 1, b"x" * 16)]) is None
    assert original_destination([(socket.SOL_IP, IP_RECVORIGDSTADDR, b"\x00" * 4)]) is None


def test_a_real_socket_reports_its_destination() -> None:
    # Without TPROXY the original destination is simply the address the datagram reached.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver, socket.socket(
        socket.AF_INET, socket.SOCK_DGRAM
    ) as sender:
        receiver.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        sender.sendto(b"ping", receiver.getsockname())
        payload, ancillary, _, _ = receiver.recvmsg(100, socket.CMSG_SPACE(28))
        assert payload == b"ping"
        assert original_destination(ancillary) == receiver.getsockname()

"""Addresses, ports and names of the test network, and the guard that keeps traffic inside it.

Every address comes from 198.18.0.0/15 (RFC 2544, reserved for benchmarking) or from the
unique-local fd00:5e::/32, and lives only inside namespaces this package creates.
"""

from __future__ import annotations

import ipaddress

OWN_RANGE = ipaddress.ip_network("198.18.0.0/15")
OWN_RANGE6 = ipaddress.ip_network("fd00:5e::/32")

C_ADDR = "198.18.1.1"  # client host, towards S
S_ADDR_C = "198.18.1.2"  # ssh server, towards C (sshd listens here)
S_ADDR_T = "198.18.2.1"  # ssh server, towards T
T_ADDR = "198.18.2.2"  # target host
T_ADDR2 = "198.18.2.3"  # second address on the target, for exclude tests
CLIENT_NET = "198.18.1.0/24"
TARGET_NET = "198.18.2.0/24"
PREFIX_LEN = 24

# The same links in IPv6 (unique-local addresses, no DAD: usable the moment they are added).
C_ADDR6 = "fd00:5e:1::1"
S_ADDR6_C = "fd00:5e:1::2"  # sshd listens here too
S_ADDR6_T = "fd00:5e:2::1"
T_ADDR6 = "fd00:5e:2::2"
T_ADDR6_2 = "fd00:5e:2::3"
CLIENT_NET6 = "fd00:5e:1::/64"
TARGET_NET6 = "fd00:5e:2::/64"
PREFIX_LEN6 = 64

# DNS: T runs a nameserver that alone knows DNS_NAME; S's resolv.conf names it. C's resolver
# is an address where nothing answers (C routes it to S, which drops it): only --dns reaches
# T's nameserver from C.
DNS_NAME = "secret.shuttle.test"
DNS_ANSWER = T_ADDR2
DNS_ANSWER6 = T_ADDR6_2
C_RESOLVER = "198.18.3.53"
# S's /etc/hosts names for T (what -H finds there): (name, address).
S_HOSTS = (("target.shuttle.test", T_ADDR), ("target6.shuttle.test", T_ADDR6))

SSH_PORT = 22
HTTP_PORT = 8080
ECHO_PORT = 7007
BULK_PORT = 9009
UDP_ECHO_PORT = 7009  # UDP: every datagram comes back, from the address it was sent to
CLOSED_PORT = 9  # nothing listens here on T

USER_NAME = "shuttle-test"
USER2_NAME = "shuttle-test2"  # a second local user: scoping, and a second session
SYSTEM_PYTHON = "/usr/bin/python3"
SSHD = "/usr/sbin/sshd"
PACKAGES = ("protocol", "ends", "local", "agent", "firewalld", "client")


def check_ours(host: str) -> str:
    """Return host if it is an address of the test network (or loopback), else raise.

    Every helper that opens a connection calls this, so a typo cannot reach a real network.
    IPv6 may come in brackets ("[fd00:5e:2::2]"); the text is returned as given.
    """
    addr = ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
    if addr in OWN_RANGE or addr in OWN_RANGE6 or addr.is_loopback:
        return host
    raise ValueError(f"{host} is outside the test network {OWN_RANGE} / {OWN_RANGE6}")


def url_host(host: str) -> str:
    """host as it goes into a URL or host:port: IPv6 in brackets."""
    check_ours(host)
    return f"[{host}]" if ":" in host and not host.startswith("[") else host

"""Addresses, ports and names of the test network, and the guard that keeps traffic inside it.

Every address comes from 198.18.0.0/15 (RFC 2544, reserved for benchmarking) and lives only
inside namespaces this package creates.
"""

from __future__ import annotations

import ipaddress

OWN_RANGE = ipaddress.ip_network("198.18.0.0/15")

C_ADDR = "198.18.1.1"  # client host, towards S
S_ADDR_C = "198.18.1.2"  # ssh server, towards C (sshd listens here)
S_ADDR_T = "198.18.2.1"  # ssh server, towards T
T_ADDR = "198.18.2.2"  # target host
T_ADDR2 = "198.18.2.3"  # second address on the target, for exclude tests
CLIENT_NET = "198.18.1.0/24"
TARGET_NET = "198.18.2.0/24"
PREFIX_LEN = 24

SSH_PORT = 22
HTTP_PORT = 8080
ECHO_PORT = 7007
BULK_PORT = 9009
CLOSED_PORT = 9  # nothing listens here on T

USER_NAME = "shuttle-test"
SYSTEM_PYTHON = "/usr/bin/python3"
SSHD = "/usr/sbin/sshd"
PACKAGES = ("protocol", "agent", "firewalld", "client")


def check_ours(host: str) -> str:
    """Return host if it is an address of the test network (or loopback), else raise.

    Every helper that opens a connection calls this, so a typo cannot reach a real network.
    """
    addr = ipaddress.ip_address(host)
    if addr in OWN_RANGE or addr.is_loopback:
        return host
    raise ValueError(f"{host} is outside the test network {OWN_RANGE}")

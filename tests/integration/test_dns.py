"""--dns, --ns-hosts and --to-ns: DNS queries on the client host answered by a nameserver
that only the server's side reaches (T's dnsmasq, named by S's resolv.conf).

C's resolver (C_RESOLVER, from C's own resolv.conf) is an address where nothing answers;
T's nameserver alone knows DNS_NAME and logs every query with its source.
"""

from __future__ import annotations

import subprocess

import pytest

from testbed import Shuttle, Topology
from testbed.config import (
    C_RESOLVER,
    DNS_ANSWER,
    DNS_ANSWER6,
    DNS_NAME,
    S_ADDR6_T,
    S_ADDR_T,
    T_ADDR6,
)
from testbed.servers import DNS_LOG

pytestmark = pytest.mark.integration

OTHER_RESOLVER = "198.18.3.99"  # another address where nothing answers


def dig(topo: Topology, *args: str) -> subprocess.CompletedProcess[str]:
    """dig +short as the test user in C; one try of 3 s."""
    return topo.run_as_user(["dig", "+short", "+time=3", "+tries=1", *args], timeout=20)


def queries(topo: Topology) -> list[str]:
    """The nameserver's log lines of queries for DNS_NAME ("query[A] NAME from ADDR")."""
    text = (topo.logs / DNS_LOG).read_text(errors="replace")
    return [line for line in text.splitlines() if f"] {DNS_NAME} from" in line]


def answered(result: subprocess.CompletedProcess[str], address: str) -> bool:
    return result.returncode == 0 and result.stdout.split() == [address]


def test_without_dns_the_query_does_not_reach_the_remote_nameserver(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    shuttle.start_client()
    for args in ((DNS_NAME,), ("+tcp", DNS_NAME)):
        result = dig(topo, *args)
        assert not answered(result, DNS_ANSWER), result
    assert queries(topo) == []


def test_dns_over_udp_and_tcp_is_answered_from_the_server_side(
    shuttle: Shuttle, method: str
) -> None:
    topo = shuttle.topo
    shuttle.start_client(method=method, extra=["--dns"])
    udp = dig(topo, DNS_NAME)
    assert answered(udp, DNS_ANSWER), f"{udp}\n{shuttle.outputs()}"
    tcp = dig(topo, "+tcp", DNS_NAME)
    assert answered(tcp, DNS_ANSWER), f"{tcp}\n{shuttle.outputs()}"
    aaaa = dig(topo, DNS_NAME, "AAAA")
    assert answered(aaaa, DNS_ANSWER6), f"{aaaa}\n{shuttle.outputs()}"
    seen = queries(topo)
    assert len(seen) >= 3, seen
    # Asked by the agent on S, from S's address towards T (S's resolv.conf names T_ADDR).
    assert all(line.endswith(f"from {S_ADDR_T}") for line in seen), seen


def test_ns_hosts_captures_only_the_servers_named(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    shuttle.start_client(extra=[f"--ns-hosts={OTHER_RESOLVER}"])
    assert answered(dig(topo, f"@{OTHER_RESOLVER}", DNS_NAME), DNS_ANSWER)
    before = len(queries(topo))
    default = dig(topo, f"@{C_RESOLVER}", DNS_NAME)
    assert not answered(default, DNS_ANSWER), default
    assert len(queries(topo)) == before


def test_to_ns_chooses_the_server_the_agent_asks(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    shuttle.start_client(extra=["--dns", f"--to-ns=[{T_ADDR6}]:53"])
    result = dig(topo, DNS_NAME)
    assert answered(result, DNS_ANSWER), f"{result}\n{shuttle.outputs()}"
    seen = queries(topo)
    assert seen and all(line.endswith(f"from {S_ADDR6_T}") for line in seen), seen

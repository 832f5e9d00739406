"""Assertions the integration tests share: a page arrives through the tunnel, a connection is
not captured, UDP echoes come back, what each firewall method leaves in the client host's
firewall; and how much a transfer has received so far.

"Not captured" is judged by what the program sees, as without shuttle: S does not forward,
so an uncaptured connection to the target times out (curl exit 28). A captured one reaches
the target through the tunnel (the page, or an echo).
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Set

from shuttle_firewalld.methods.tproxy import MARK_BASE

from testbed import (
    ECHO_PORT,
    HTTP_PORT,
    T_ADDR,
    TARGET_NET,
    TARGET_NET6,
    TPROXY,
    UDP_ECHO_PORT,
    LocalUser,
    Shuttle,
    Topology,
    nat_chains,
    nft_tables,
    ready_line,
    ready_method,
)
from testbed.config import url_host
from testbed.netns import Namespace
from testbed.procs import Proc

DATAGRAMS = 20  # tcptool's default: sizes 32 to 1400 bytes, and one of 8000
CURL_TIMED_OUT = 28
UNCAPTURED_WAIT = 2.0  # seconds curl waits for a connection that must not be made
TUNNEL_WAIT = 20.0  # seconds curl may take through the tunnel (generous; not a timing check)

RECONNECTED = "shuttle-client: reconnected agent"  # its log line once a stream is back
SUBNETS = (TARGET_NET, TARGET_NET6)  # what the tproxy tests capture unless told


def who(user: Optional[LocalUser], topo: Topology) -> str:
    return (user or topo.user).name


def assert_page(
    shuttle: Shuttle, host: str, port: int = HTTP_PORT, user: Optional[LocalUser] = None
) -> None:
    """curl as user (default the first test user) gets the target's page from host:port."""
    topo = shuttle.topo
    result = topo.curl(host, port, max_time=TUNNEL_WAIT, user=user)
    assert result.returncode == 0, (
        f"curl as {who(user, topo)} to {host}:{port}: exit {result.returncode}: "
        f"{result.stderr.strip()}\n{shuttle.outputs()}"
    )
    assert topo.marker in result.stdout, f"not the target's page: {result.stdout[:500]!r}"


def assert_not_captured(
    shuttle: Shuttle, host: str, port: int = HTTP_PORT, user: Optional[LocalUser] = None
) -> None:
    """curl as user to host:port times out, as it does without shuttle."""
    topo = shuttle.topo
    result = topo.curl(host, port, max_time=UNCAPTURED_WAIT, user=user)
    assert result.returncode == CURL_TIMED_OUT, (
        f"curl as {who(user, topo)} to {host}:{port} should time out (not captured), "
        f"got exit {result.returncode}: {result.stderr.strip()} {result.stdout[:200]!r}\n"
        f"{shuttle.outputs()}"
    )


def assert_echo(
    shuttle: Shuttle, host: str, port: int = ECHO_PORT, user: Optional[LocalUser] = None
) -> None:
    """A few simultaneous echo connections as user to host:port come back byte-exact."""
    result = shuttle.topo.tcptool("echo", host, str(port), "5", timeout=30, user=user)
    assert result["ok"], f"echo to {host}:{port}: {result}\n{shuttle.outputs()}"


def assert_udp_echo(shuttle: Shuttle, host: str, **kwargs: Any) -> Dict[str, Any]:
    """Every datagram to host's UDP echo comes back byte-exact, from host and its port."""
    result = shuttle.topo.udp_echo(host, **kwargs)
    assert result["ok"], f"UDP echo to {host}: {result}\n{shuttle.outputs()}"
    assert result["echoed"] == result["datagrams"] == kwargs.get("count", DATAGRAMS), result
    assert result["sources"] == [f"{url_host(host)}:{UDP_ECHO_PORT}"], result
    return result


def received(topo: Topology, port: int) -> int:
    """Bytes received so far by C's connections to T's port (ss -i: bytes_received)."""
    out = topo.c.run(["ss", "-tin", "dst", f"{T_ADDR}:{port}"], timeout=10).stdout
    return sum(int(m) for m in re.findall(r"bytes_received:(\d+)", out))


def firewall_objects(topo: Topology) -> Set[str]:
    """shuttle's tables and chains in C, named by where they are: nft:shuttle-..., ip4:SHUTTLE-...,
    ip6:SHUTTLE-... (for comparing what stays when a session ends)."""
    objects = {f"nft:{table}" for table in nft_tables(topo)}
    for version, chains in nat_chains(topo).items():
        objects |= {f"ip{version}:{chain}" for chain in chains}
    return objects


def assert_method_rules(
    shuttle: Shuttle, method: str, *, ipv4: bool = True, ipv6: bool = True
) -> None:
    """The firewall shows the rules of method, and none of the other method.

    nft and tproxy: a table `inet shuttle-<12 hex>`, and no SHUTTLE chain in iptables or
    ip6tables; nat: SHUTTLE-<12 hex> chains in the nat table of each family in use, and no
    nft table.
    """
    topo = shuttle.topo
    tables = nft_tables(topo)
    chains = nat_chains(topo)
    seen = f"nft tables {tables}, iptables chains {chains[4]}, ip6tables chains {chains[6]}"
    if method in ("nft", "tproxy"):
        assert tables, f"no inet shuttle-* table for {method}: {seen}\n{shuttle.outputs()}"
        assert not chains[4] and not chains[6], f"nat chains with the {method} method: {seen}"
    else:
        assert not tables, f"an nft shuttle table with the nat method: {seen}"
        if ipv4:
            assert chains[4], f"no SHUTTLE chain in iptables' nat table: {seen}"
        if ipv6:
            assert chains[6], f"no SHUTTLE chain in ip6tables' nat table: {seen}"


def assert_no_rules(topo: Topology) -> None:
    """No shuttle table or chain in any of the three views (nft, iptables, ip6tables)."""
    objects = firewall_objects(topo)
    assert not objects, f"shuttle tables or chains left: {sorted(objects)}"


def start_tproxy(shuttle: Shuttle, **kwargs: Any) -> Proc:
    """shuttle-client --method tproxy (both families unless told); its ready line says so."""
    kwargs.setdefault("subnets", SUBNETS)
    client = shuttle.start_client(method=TPROXY, **kwargs)
    assert ready_method(client) == TPROXY, ready_line(client)
    return client


def rules_in(ns: Namespace) -> List[str]:
    """shuttle's nft tables, iptables chains and fwmark rules (tproxy's) in ns."""
    tables = ns.run(["nft", "list", "tables"], check=True).stdout
    chains = ns.run(["iptables-save"], check=True).stdout
    marks = ns.run(["ip", "rule", "show"], check=True).stdout
    return [
        line
        for line in (tables + chains + marks).splitlines()
        if "shuttle" in line.lower() or f"fwmark {MARK_BASE >> 16:#x}" in line
    ]

"""The SUBNET syntax end to end: port ranges, IPv6 in brackets, excludes (also from a file),
includes from a file, and 0/0 and ::/0 (the ssh server's own address is left alone)."""

from __future__ import annotations

from typing import List, NamedTuple

import pytest

from testbed import (
    ECHO_PORT,
    HTTP_PORT,
    S_ADDR6_C,
    S_ADDR_C,
    SYSTEM_PYTHON,
    T_ADDR,
    T_ADDR2,
    T_ADDR6,
    T_ADDR6_2,
    TARGET_NET,
    TARGET_NET6,
    Shuttle,
)
from testbed.config import C_ADDR

from .checks import (
    UNCAPTURED_WAIT,
    assert_echo,
    assert_method_rules,
    assert_not_captured,
    assert_page,
)

pytestmark = pytest.mark.integration


class PortCase(NamedTuple):
    subnet: str  # what the client captures
    host: str  # a target address inside it
    captured: int  # the port inside the range: reached through the tunnel
    other: int  # a port outside it on the same host: not captured


PORT_CASES = {
    "v4-port": PortCase("198.18.2.0/24:8080", T_ADDR, HTTP_PORT, ECHO_PORT),
    "v4-range": PortCase("198.18.2.0/24:7000-7010", T_ADDR, ECHO_PORT, HTTP_PORT),
    "v6-range": PortCase("[fd00:5e:2::]/64:8080-8081", T_ADDR6, HTTP_PORT, ECHO_PORT),
    "v6-address-port": PortCase("[fd00:5e:2::2]:7007", T_ADDR6, ECHO_PORT, HTTP_PORT),
}


@pytest.mark.parametrize("case", list(PORT_CASES.values()), ids=list(PORT_CASES))
def test_port_subnet_captures_only_its_ports(shuttle: Shuttle, method: str, case: PortCase) -> None:
    shuttle.start_client(subnets=[case.subnet], method=method)
    if case.captured == HTTP_PORT:
        assert_page(shuttle, case.host, HTTP_PORT)
    else:
        assert_echo(shuttle, case.host, ECHO_PORT)
    # The same host on a port outside the range: not captured, so it times out as without.
    assert_not_captured(shuttle, case.host, case.other)


def test_excluded_subnets_are_not_captured(shuttle: Shuttle, method: str) -> None:
    """-x in both families (a bare IPv6 address too); the host's other address still works."""
    shuttle.start_client(
        subnets=[TARGET_NET, TARGET_NET6], excludes=[f"{T_ADDR}/32", T_ADDR6], method=method
    )
    assert_not_captured(shuttle, T_ADDR)
    assert_not_captured(shuttle, T_ADDR6)
    assert_page(shuttle, T_ADDR2)
    assert_page(shuttle, T_ADDR6_2)


def test_excluded_port_is_not_captured(shuttle: Shuttle, method: str) -> None:
    """An exclude with a port leaves only that port alone."""
    shuttle.start_client(
        subnets=[TARGET_NET, TARGET_NET6],
        excludes=[f"{T_ADDR}/32:{HTTP_PORT}", f"[{T_ADDR6}]:{HTTP_PORT}"],
        method=method,
    )
    for host, other in ((T_ADDR, T_ADDR2), (T_ADDR6, T_ADDR6_2)):
        assert_not_captured(shuttle, host, HTTP_PORT)
        assert_echo(shuttle, host, ECHO_PORT)  # same address, another port: captured
        assert_page(shuttle, other, HTTP_PORT)


EXCLUDE_FILE = f"""\
# addresses the tunnel must leave alone
{T_ADDR}/32   # the target's first IPv4 address
{T_ADDR6}/128
"""

INCLUDE_FILE = f"""\
# the target network, both families
{TARGET_NET}
   {TARGET_NET6}  # on a line of its own, indented

"""


def test_exclude_file(shuttle: Shuttle, method: str) -> None:
    path = shuttle.topo.write_user_file("excludes.txt", EXCLUDE_FILE)
    shuttle.start_client(subnets=[TARGET_NET, TARGET_NET6], exclude_files=[path], method=method)
    assert_not_captured(shuttle, T_ADDR)
    assert_not_captured(shuttle, T_ADDR6)
    assert_page(shuttle, T_ADDR2)
    assert_page(shuttle, T_ADDR6_2)


def test_include_and_exclude_files(shuttle: Shuttle, method: str) -> None:
    """-s FILE alone names what to capture (no SUBNET argument); -X FILE what not to."""
    topo = shuttle.topo
    includes = topo.write_user_file("includes.txt", INCLUDE_FILE)
    excludes = topo.write_user_file("excludes.txt", EXCLUDE_FILE)
    shuttle.start_client(
        subnets=[], include_files=[includes], exclude_files=[excludes], method=method
    )
    assert_method_rules(shuttle, method)
    assert_page(shuttle, T_ADDR2)
    assert_page(shuttle, T_ADDR6_2)
    assert_not_captured(shuttle, T_ADDR)
    assert_not_captured(shuttle, T_ADDR6)


@pytest.mark.parametrize(
    ("subnets", "remote"),
    [
        (["0/0"], S_ADDR_C),
        (["::/0"], S_ADDR6_C),
        (["0/0", "::/0"], S_ADDR_C),
        (["0/0", "::/0"], S_ADDR6_C),
    ],
    ids=["0/0-ssh-v4", "::/0-ssh-v6", "both-ssh-v4", "both-ssh-v6"],
)
def test_everything_captured_but_the_ssh_server(
    shuttle: Shuttle, method: str, subnets: List[str], remote: str
) -> None:
    """With all of a family captured, the ssh connection to S must not be: the tunnel stays
    up and the page arrives, more than once."""
    topo = shuttle.topo
    client = shuttle.start_client(subnets=subnets, remote=remote, method=method)
    hosts = [T_ADDR] if "0/0" in subnets else []
    hosts += [T_ADDR6] if "::/0" in subnets else []
    for host in hosts:
        assert_page(shuttle, host)
    for host in hosts:
        assert_page(shuttle, host)
    assert client.alive(), shuttle.outputs()
    # The server's own address is in the rules, as an exclusion.
    ruleset = "\n".join(
        topo.c.run(argv, timeout=15, check=True).stdout
        for argv in (["nft", "list", "ruleset"], ["ip6tables-save", "-t", "nat"])
    )
    assert remote in ruleset, f"{remote} (the ssh server) is not in the rules:\n{ruleset}"


DIRECT_PORT = 18080  # the wildcard listener's port, and a loopback server's on S
# The reset, as curl says it: at once (7, "Couldn't connect to server"), or once it has
# sent its request (56, "Recv failure: Connection reset by peer").
CURL_RESET = (7, 56)


@pytest.mark.parametrize("method", ["nft", "nat"])  # tproxy's listeners are firewalld's
def test_direct_connections_to_a_wildcard_listener_are_refused(
    shuttle: Shuttle, method: str
) -> None:
    """-l 0.0.0.0:P: a connection straight to 127.0.0.1:P or to C's own address:P was never
    captured, and becomes no channel (to S's 127.0.0.1:P, say); a captured one works. (With
    tproxy, the UDP socket's case: tests/client/test_udp.py.)"""
    topo = shuttle.topo
    www = topo.run_dir / "s-loopback"
    www.mkdir()
    (www / "index.html").write_text("only on S's loopback\n")
    server = topo.s.start(
        "s-loopback",
        [SYSTEM_PYTHON, "-m", "http.server", str(DIRECT_PORT), "--bind", "127.0.0.1"],
        topo.logs / "s-loopback.log",
        cwd=www,
    )
    topo.procs.append(server)
    assert topo.s.wait_listening(DIRECT_PORT), server.describe()
    # A wildcard listener captures routed traffic too, which needs the policy's forward.
    shuttle.stop_firewalld()
    shuttle.write_policy(f"allow {topo.user.name} forward\n")
    shuttle.start_firewalld()
    client = shuttle.start_client(method=method, extra=["-l", f"0.0.0.0:{DIRECT_PORT}"])
    for host in ("127.0.0.1", C_ADDR):
        result = topo.curl(host, DIRECT_PORT, max_time=UNCAPTURED_WAIT)
        assert result.returncode in CURL_RESET, (
            f"{host}: exit {result.returncode}: {result.stderr.strip()} "
            f"{result.stdout[:200]!r}\n{shuttle.outputs()}"
        )
        assert "only on S's loopback" not in result.stdout
    assert_page(shuttle, T_ADDR)
    # One line (the second reset comes within its interval) names the first.
    assert client.wait_for_line("shuttle-client: reset 1 connection(s) the firewall did not", 5)
    assert f"to 127.0.0.1:{DIRECT_PORT}), sent to the listener itself" in client.output()

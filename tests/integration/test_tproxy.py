"""The tproxy method: firewalld makes transparent TCP and UDP sockets and hands them to the
unprivileged client, so TCP and UDP to the target both go through the tunnel, in both IP
families. A captured datagram's answer must come back from the original destination's address
and port; a datagram that is not captured (excluded, another user's) gets no answer, as
without shuttle. Stopped or killed, the client leaves no nft table, no fwmark `ip rule` and no
routing table behind.
"""

from __future__ import annotations

import json
import signal
from typing import Any, List

import pytest

from testbed import (
    ECHO_PORT,
    S_ADDR6_C,
    S_ADDR_C,
    T_ADDR,
    T_ADDR2,
    T_ADDR6,
    T_ADDR6_2,
    UDP_ECHO_PORT,
    Shuttle,
    nat_chains,
    nft_tables,
    reply_attacker,
    routing_leftovers,
)
from testbed.config import C_ADDR, C_ADDR6
from testbed.procs import Dialogue

from .checks import (
    assert_echo,
    assert_no_rules,
    assert_not_captured,
    assert_page,
    assert_udp_echo,
    start_tproxy,
)

pytestmark = pytest.mark.integration


def assert_udp_silent(shuttle: Shuttle, host: str, **kwargs: Any) -> None:
    """Datagrams to host's UDP echo get no answer: not captured (S does not forward)."""
    result = shuttle.topo.udp_silent(host, **kwargs)
    assert result["ok"], f"UDP to {host} should get no answer: {result}\n{shuttle.outputs()}"


def policy_routing(shuttle: Shuttle) -> List[str]:
    """The fwmark rules and routing tables C has now and had not before firewalld started."""
    assert shuttle.routing_before is not None
    return routing_leftovers(shuttle.topo, shuttle.routing_before)


def assert_tproxy_rules(shuttle: Shuttle) -> None:
    """An nft table of the session, no nat chain, and per family a fwmark rule and a table."""
    topo = shuttle.topo
    tables = nft_tables(topo)
    assert tables, f"no inet shuttle-* table for the tproxy method\n{shuttle.outputs()}"
    chains = nat_chains(topo)
    assert not chains[4] and not chains[6], f"nat chains with the tproxy method: {chains}"
    routing = policy_routing(shuttle)
    for version in ("-4", "-6"):
        rules = [line for line in routing if line.startswith(f"ip {version} rule:")]
        routes = [line for line in routing if line.startswith(f"ip {version} table ")]
        assert rules, f"no new fwmark rule in `ip {version} rule`: {routing}"
        assert routes, f"no new routing table in `ip {version} route show table all`: {routing}"


def assert_all_gone(shuttle: Shuttle, timeout: float) -> None:
    left = shuttle.wait_rules_gone(timeout=timeout)
    assert not left, f"left behind: {left}\n{shuttle.outputs()}"
    assert_no_rules(shuttle.topo)
    assert not policy_routing(shuttle)


# --- TCP -------------------------------------------------------------------------------------


def test_tcp_through_tproxy_both_families(shuttle: Shuttle) -> None:
    for host in (T_ADDR, T_ADDR6):
        assert_not_captured(shuttle, host)  # without shuttle: unreachable
    start_tproxy(shuttle)
    assert_tproxy_rules(shuttle)
    for host in (T_ADDR, T_ADDR6):
        assert_page(shuttle, host)
        assert_echo(shuttle, host, ECHO_PORT)


# --- UDP -------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", [T_ADDR, T_ADDR6], ids=["ipv4", "ipv6"])
def test_udp_echo_through_tproxy(shuttle: Shuttle, host: str) -> None:
    """No answer without shuttle; through it every datagram, from the target's address."""
    assert_udp_silent(shuttle, host)
    start_tproxy(shuttle)
    assert_udp_echo(shuttle, host)
    assert_udp_echo(shuttle, host)  # a second flow (another local port) works as well


def test_udp_excluded_address_is_not_captured(shuttle: Shuttle) -> None:
    """-x for one address per family: its datagrams get no answer; the target's other
    address is captured and answers, from itself."""
    start_tproxy(shuttle, excludes=[f"{T_ADDR}/32", T_ADDR6])
    assert_udp_silent(shuttle, T_ADDR)
    assert_udp_silent(shuttle, T_ADDR6)
    assert_udp_echo(shuttle, T_ADDR2)
    assert_udp_echo(shuttle, T_ADDR6_2)


def test_other_users_udp_and_tcp_are_not_captured(shuttle: Shuttle) -> None:
    topo = shuttle.topo
    start_tproxy(shuttle)
    for host in (T_ADDR, T_ADDR6):
        assert_udp_silent(shuttle, host, user=topo.user2)
        assert_not_captured(shuttle, host, user=topo.user2)
    # The session's own user still gets through, in both protocols.
    for host in (T_ADDR, T_ADDR6):
        assert_udp_echo(shuttle, host)
        assert_page(shuttle, host)


# --- another member's reply sockets ---------------------------------------------------------

# A program of the first user: on each line of stdin one datagram to T's UDP echo, then every
# datagram that came back within a second, with its sender, as JSON.
PROGRAM = f"""\
import json, select, socket, sys
program = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
program.bind(("0.0.0.0", 0))
print(program.getsockname()[1], flush=True)
for line in sys.stdin:
    program.sendto(line.strip().encode(), ("{T_ADDR}", {UDP_ECHO_PORT}))
    got = []
    while select.select([program], [], [], 1.0)[0]:
        answer, sender = program.recvfrom(65535)
        got.append([answer.decode(), list(sender[:2])])
    print(json.dumps(got), flush=True)
"""


def test_another_member_can_neither_spoof_nor_steal_the_users_udp(shuttle: Shuttle) -> None:
    """The second user, in firewalld's group too, with a tproxy session of its own on
    everything, tries testbed/reply_attacker.py's attacks on a flow of the first user's
    program, which the first user's client carries: each fails, and the flow goes on."""
    topo = shuttle.topo
    start_tproxy(shuttle)
    python = shuttle.venv.program("python")
    program = Dialogue(topo.user_argv([python, "-c", PROGRAM]))
    processes = [program]
    try:
        port = int(program.line())
        program.tell("before")
        before = json.loads(program.line())
        attack = {
            "socket": str(shuttle.socket),
            "victim_uid": topo.user.uid,
            "program": C_ADDR,
            "program6": C_ADDR6,
            "destination": T_ADDR,
            "port": UDP_ECHO_PORT,
            "broadcast": "198.18.1.255",
            "network": "198.18.1.0",
            "network6": "fd00:5e:1::",
            "spoofed": T_ADDR2,
            "spoofed6": T_ADDR6_2,
            "outside": S_ADDR_C,
            "outside6": S_ADDR6_C,
        }
        argv = [python, reply_attacker.__file__, json.dumps(attack)]
        attacker = Dialogue(topo.user_argv(argv, user=topo.user2))
        processes.append(attacker)
        assert attacker.line() == "ready\n"
        program.tell("during")
        during = json.loads(program.line())
        attacker.tell("go on")
        results = json.loads(attacker.line())
        program.tell("after")
        after = json.loads(program.line())
    finally:
        for process in processes:
            process.close()
    # Each datagram echoed once, from T's echo, through the first user's client; no other.
    echo = [f"{T_ADDR}", UDP_ECHO_PORT]
    assert [before, during, after] == [[[word, echo]] for word in ("before", "during", "after")]
    refused = "Operation not permitted"
    assert results == {
        "victims flow": f"shuttle-firewalld: the program's socket at {C_ADDR}:{port} is uid "
        f"{topo.user.uid}'s, whose traffic this session does not capture (only uid "
        f"{topo.user2.uid}'s)",
        "broadcast": "shuttle-firewalld: 198.18.1.255:53 is a broadcast address, not one a "
        "reply may come from",
        "network": "shuttle-firewalld: 198.18.1.0:53 is the network address of 198.18.1.0/24, "
        "a subnet of this host",
        "network6": "shuttle-firewalld: [fd00:5e:1::]:53 is the network address of "
        "fd00:5e:1::/64, a subnet of this host",
        "sent": {
            "outside": refused,
            "victim": refused,
            "outside6": refused,
            "own": "sent",
            "own6": "sent",
        },
        "own": [[T_ADDR2, 53], [T_ADDR6_2, 53]],
        "fences": [refused] * 3,
        "hijack": refused,
        "stolen": "timed out",
    }


# --- leftovers -------------------------------------------------------------------------------


def test_stopped_client_leaves_nothing(shuttle: Shuttle) -> None:
    client = start_tproxy(shuttle)
    assert_tproxy_rules(shuttle)
    assert_udp_echo(shuttle, T_ADDR, count=3)
    code = shuttle.stop_client(client)
    assert code == 0, f"exit code {code}\n{shuttle.outputs()}"
    # The client closes its session before it exits; allow firewalld a moment to finish.
    assert_all_gone(shuttle, timeout=5)
    assert_udp_silent(shuttle, T_ADDR)
    assert_not_captured(shuttle, T_ADDR6)


def test_killed_client_leaves_nothing_after_the_lease(shuttle: Shuttle) -> None:
    client = start_tproxy(shuttle)
    assert_tproxy_rules(shuttle)
    assert_udp_echo(shuttle, T_ADDR6, count=3)
    client.send(signal.SIGKILL)
    assert client.wait(10) == -signal.SIGKILL
    assert_all_gone(shuttle, timeout=shuttle.lease + 5)
    assert_udp_silent(shuttle, T_ADDR6)

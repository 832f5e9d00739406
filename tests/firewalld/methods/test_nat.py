"""The nat method: the exact iptables-restore text per IP version, and what it runs when;
then real chains in a namespace."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from shuttle_client.firewall_session import FirewallError
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.methods.nat import (
    TOOLS,
    NatMethod,
    apply_text,
    chain_name,
    guard_refill_text,
    guard_removal_text,
    guard_rules,
    guard_text,
    jump_rules,
    refill_text,
    removal_text,
    stale_rules,
)

from firewalld.captures import (
    close_session,
    open_session,
    update_session,
)
from firewalld.daemon import (
    Daemon,
    Listener,
    nat6_rules,
    nat_rules,
    nothing_of_shuttle,
    shuttle_rules,
)
from firewalld.fakes import make_session, make_shortcut, make_target
from firewalld.traffic import in_netns

CHAIN = "SHUTTLE-0123456789ab"
RESTORE4, RESTORE6 = TOOLS[4].restore, TOOLS[6].restore


def test_names() -> None:
    session = make_session()
    assert chain_name(session) == CHAIN
    assert jump_rules(session, 4) == [f"OUTPUT -p tcp -m owner --uid-owner 1000 -j {CHAIN}"]


@pytest.mark.parametrize(
    ("uid", "gid", "forward", "jumps"),
    [
        (-1, -1, False, [f"OUTPUT -p tcp -j {CHAIN}"]),
        (-1, 100, False, [f"OUTPUT -p tcp -m owner --gid-owner 100 -j {CHAIN}"]),
        (1000, 100, False, [f"OUTPUT -p tcp -m owner --uid-owner 1000 --gid-owner 100 -j {CHAIN}"]),
        (
            1000,
            -1,
            True,
            [
                f"OUTPUT -p tcp -m owner --uid-owner 1000 -j {CHAIN}",
                f"PREROUTING ! -d 127.0.0.0/8 -p tcp -j {CHAIN}",
            ],
        ),
    ],
)
def test_scope(uid: int, gid: int, forward: bool, jumps: list[str]) -> None:
    session = make_session(uid=uid, gid=gid, forward=forward)
    assert jump_rules(session, 4) == jumps
    assert apply_text(session, 4).splitlines()[-1 - len(jumps) : -1] == [f"-A {j}" for j in jumps]


MIXED = make_session(
    ["10.0.0.0/8", ("192.0.2.0/24", 80, 90), ("fd00:5e::/32", 443, 443), "2001:db8::/48"],
    [("10.1.2.3/32", 22, 22), "10.1.0.0/16", ("fd00:5e:1::/48", 1, 1024)],
)


def test_apply_text_ipv4() -> None:
    assert apply_text(MIXED, 4).splitlines() == [
        "*nat",
        f":{CHAIN} - [0:0]",
        f"-A {CHAIN} -m addrtype --dst-type LOCAL -j RETURN",
        f"-A {CHAIN} -d 127.0.0.0/8 -j RETURN",
        f"-A {CHAIN} -d 10.1.2.3/32 -p tcp -m tcp --dport 22 -j RETURN",
        f"-A {CHAIN} -d 10.1.0.0/16 -j RETURN",
        f"-A {CHAIN} -d 10.0.0.0/8 -p tcp -j REDIRECT --to-ports 12300",
        f"-A {CHAIN} -d 192.0.2.0/24 -p tcp -m tcp --dport 80:90 -j REDIRECT --to-ports 12300",
        f"-A OUTPUT -p tcp -m owner --uid-owner 1000 -j {CHAIN}",
        "COMMIT",
    ]


def test_apply_text_ipv6() -> None:
    assert apply_text(MIXED, 6).splitlines() == [
        "*nat",
        f":{CHAIN} - [0:0]",
        f"-A {CHAIN} -m addrtype --dst-type LOCAL -j RETURN",
        f"-A {CHAIN} -d ::1/128 -j RETURN",
        f"-A {CHAIN} -d fd00:5e:1::/48 -p tcp -m tcp --dport 1:1024 -j RETURN",
        f"-A {CHAIN} -d fd00:5e::/32 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 12300",
        f"-A {CHAIN} -d 2001:db8::/48 -p tcp -j REDIRECT --to-ports 12300",
        f"-A OUTPUT -p tcp -m owner --uid-owner 1000 -j {CHAIN}",
        "COMMIT",
    ]


def test_a_sessions_bypass_sockets_skip_its_dns_redirects_only() -> None:
    session = make_session(["10.0.0.0/8"], dns=["10.53.0.53"], forward=True)
    session.bypass_mark = 0x53484001
    redirect = "-j REDIRECT --to-ports 12300"
    bypass = "-m mark --mark 0x53484001 -j RETURN"
    assert apply_text(session, 4).splitlines()[2:6] == [
        f"-A {CHAIN} -d 10.53.0.53/32 -p tcp -m tcp --dport 53 {bypass}",
        f"-A {CHAIN} -d 10.53.0.53/32 -p tcp -m tcp --dport 53 {redirect}",
        f"-A {CHAIN} -d 10.53.0.53/32 -p udp -m udp --dport 53 {bypass}",
        f"-A {CHAIN} -d 10.53.0.53/32 -p udp -m udp --dport 53 {redirect}",
    ]
    assert apply_text(session, 4).count("--mark") == 2
    # Without forward, only the caller's own sockets (bypass sockets are made as its).
    session.forward = False
    assert f"--dport 53 {bypass.replace(' -j', ' -m owner --uid-owner 1000 -j')}" in (
        apply_text(session, 4)
    )


def test_nameservers_come_first_and_udp_to_port_53_jumps_too() -> None:
    session = make_session(
        ["10.0.0.0/8"], ["10.53.0.0/16"], dns=["10.53.0.53", "127.0.0.53", "fd00:53::53"]
    )
    redirect = "-j REDIRECT --to-ports 12300"
    assert apply_text(session, 4).splitlines() == [
        "*nat",
        f":{CHAIN} - [0:0]",
        f"-A {CHAIN} -d 10.53.0.53/32 -p tcp -m tcp --dport 53 {redirect}",
        f"-A {CHAIN} -d 10.53.0.53/32 -p udp -m udp --dport 53 {redirect}",
        f"-A {CHAIN} -d 127.0.0.53/32 -p tcp -m tcp --dport 53 {redirect}",
        f"-A {CHAIN} -d 127.0.0.53/32 -p udp -m udp --dport 53 {redirect}",
        f"-A {CHAIN} -m addrtype --dst-type LOCAL -j RETURN",
        f"-A {CHAIN} -d 127.0.0.0/8 -j RETURN",
        f"-A {CHAIN} -d 10.53.0.0/16 -j RETURN",
        f"-A {CHAIN} -d 10.0.0.0/8 -p tcp {redirect}",
        f"-A OUTPUT -p tcp -m owner --uid-owner 1000 -j {CHAIN}",
        f"-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 1000 -j {CHAIN}",
        "COMMIT",
    ]
    # The IPv6 chain is there for the nameserver alone.
    assert apply_text(session, 6).splitlines()[2:-3] == [
        f"-A {CHAIN} -d fd00:53::53/128 -p tcp -m tcp --dport 53 {redirect}",
        f"-A {CHAIN} -d fd00:53::53/128 -p udp -m udp --dport 53 {redirect}",
        f"-A {CHAIN} -m addrtype --dst-type LOCAL -j RETURN",
        f"-A {CHAIN} -d ::1/128 -j RETURN",
    ]
    tools = FakeTools()
    assert NatMethod(tools).apply(session) == 10 + 6
    assert [argv[0] for argv, _ in tools.runs] == ["iptables-restore", "ip6tables-restore"]


def test_forwarded_dns_jumps_only_for_addresses_that_are_not_loopback() -> None:
    session = make_session(dns=["10.53.0.53", "127.0.0.53"], uid=-1, forward=True)
    assert jump_rules(session, 4) == [
        f"OUTPUT -p tcp -j {CHAIN}",
        f"OUTPUT -p udp -m udp --dport 53 -j {CHAIN}",
        f"PREROUTING ! -d 127.0.0.0/8 -p tcp -j {CHAIN}",
        f"PREROUTING ! -d 127.0.0.0/8 -p udp -m udp --dport 53 -j {CHAIN}",
    ]
    assert jump_rules(session, 6) == [
        f"OUTPUT -p tcp -j {CHAIN}",
        f"PREROUTING ! -d ::1/128 -p tcp -j {CHAIN}",
    ]


def test_shortcuts_sit_between_the_returns_and_the_capture() -> None:
    session = make_session(["10.0.0.0/8", "fd00:5e::/32"], ["10.1.0.0/16"])
    session.shortcuts = (
        make_shortcut("10.2.0.2", 7007, 40123),
        make_shortcut("fd00:5e::5", 443, 40124, limit=1),
    )
    limit = "-m connlimit --connlimit-upto"
    assert apply_text(session, 4).splitlines()[4:-2] == [
        f"-A {CHAIN} -d 10.1.0.0/16 -j RETURN",
        f"-A {CHAIN} -d 10.2.0.2/32 -p tcp -m tcp --dport 7007 {limit} 200 --connlimit-mask 32 "
        "--connlimit-daddr -j REDIRECT --to-ports 40123",
        f"-A {CHAIN} -d 10.0.0.0/8 -p tcp -j REDIRECT --to-ports 12300",
    ]
    assert apply_text(session, 6).splitlines()[4:-2] == [
        f"-A {CHAIN} -d fd00:5e::5/128 -p tcp -m tcp --dport 443 {limit} 1 --connlimit-mask 128 "
        "--connlimit-daddr -j REDIRECT --to-ports 40124",
        f"-A {CHAIN} -d fd00:5e::/32 -p tcp -j REDIRECT --to-ports 12300",
    ]
    # Set by an update: the chain refilled, the jumps (which match the owner) as they were.
    tools = FakeTools()
    plain = make_session(["10.0.0.0/8", "fd00:5e::/32"], ["10.1.0.0/16"])
    # 11, and of each version the guard's rule and jump; each guard before its shortcuts.
    assert NatMethod(tools).update(plain, plain.subnets, plain.excludes, session.shortcuts) == 15
    assert tools.runs == [
        (list(RESTORE4), guard_text(session, 4)),
        (list(RESTORE4), refill_text(session, 4)),
        (list(RESTORE6), guard_text(session, 6)),
        (list(RESTORE6), refill_text(session, 6)),
    ]


RESET = "-j REJECT --reject-with tcp-reset"
SYN = "-p tcp -m tcp --dport 40123 --tcp-flags FIN,SYN,RST,ACK SYN -m owner"


@pytest.mark.parametrize(
    ("uid", "gid", "others"),
    [
        (1000, -1, ["! --uid-owner 1000"]),
        (-1, 100, ["! --gid-owner 100"]),
        # Either mismatch resets: two rules, not one rule of both.
        (1000, 100, ["! --uid-owner 1000", "! --gid-owner 100"]),
    ],
)
def test_the_guard_resets_other_owners_syns_to_each_local_port(
    uid: int, gid: int, others: list[str]
) -> None:
    session = make_session(["10.0.0.0/8", "fd00:5e::/32"], uid=uid, gid=gid)
    session.shortcuts = (make_shortcut("10.2.0.2", 7007, 40123),)
    assert guard_text(session, 4).splitlines() == [
        "*filter",
        f":{CHAIN} - [0:0]",
        *(f"-A {CHAIN} {SYN} {other} {RESET}" for other in others),
        # At the top of filter OUTPUT: a host's ACCEPT there would pass an appended jump.
        f"-I OUTPUT -d 127.0.0.0/8 -p tcp -j {CHAIN}",
        "COMMIT",
    ]
    assert guard_rules(session, 6) == []  # no IPv6 shortcut
    assert guard_removal_text(session, 4).splitlines() == [
        "*filter",
        f"-D OUTPUT -d 127.0.0.0/8 -p tcp -j {CHAIN}",
        f"-F {CHAIN}",
        f"-X {CHAIN}",
        "COMMIT",
    ]


def test_no_guard_without_an_owner_match() -> None:
    session = make_session(["10.0.0.0/8"], uid=-1)
    session.shortcuts = (make_shortcut("10.2.0.2", 7007, 40123),)
    assert guard_rules(session, 4) == []
    tools = FakeTools()
    assert NatMethod(tools).apply(session) == 5
    assert tools.runs == [(list(RESTORE4), apply_text(session, 4))]


def guarded(*shortcuts: tuple[str, int, int]) -> Any:
    session = make_session(["10.0.0.0/8", "fd00:5e::/32"])
    session.shortcuts = tuple(make_shortcut(*shortcut) for shortcut in shortcuts)
    return session


def test_a_guard_comes_before_its_shortcuts_and_goes_after_them() -> None:
    session = guarded(("10.2.0.2", 7007, 40123))
    tools = FakeTools()
    assert NatMethod(tools).apply(session) == 5 + 2 + 4
    assert tools.runs == [
        (list(RESTORE4), guard_text(session, 4)),
        (list(RESTORE4), apply_text(session, 4)),
        (list(RESTORE6), apply_text(session, 6)),
    ]
    tools.runs.clear()
    NatMethod(tools).remove(session)
    assert tools.runs == [
        (list(RESTORE4), removal_text(jump_rules(session, 4), [CHAIN])),
        (list(RESTORE4), guard_removal_text(session, 4)),
        (list(RESTORE6), removal_text(jump_rules(session, 6), [CHAIN])),
    ]
    # An update that moves the shortcut to IPv6: IPv4's guard goes after its shortcut,
    # IPv6's comes before its own; one that changes the local port refills the guard.
    tools.runs.clear()
    moved = guarded(("fd00:5e::5", 7007, 40123))
    assert NatMethod(tools).update(session, session.subnets, (), moved.shortcuts) == 4 + 7
    assert tools.runs == [
        (list(RESTORE4), refill_text(moved, 4)),
        (list(RESTORE4), guard_removal_text(session, 4)),
        (list(RESTORE6), guard_text(moved, 6)),
        (list(RESTORE6), refill_text(moved, 6)),
    ]
    tools.runs.clear()
    other_port = guarded(("10.2.0.2", 7007, 40124))
    NatMethod(tools).update(session, session.subnets, (), other_port.shortcuts)
    assert tools.runs[0] == (list(RESTORE4), guard_refill_text(other_port, 4))
    assert "-I OUTPUT" not in tools.runs[0][1]  # the jump stays as it is


def test_a_failed_shortcut_commit_takes_its_guard_back_out() -> None:
    session = guarded(("10.2.0.2", 7007, 40123))
    tools = FakeTools(fail_text="connlimit")
    with pytest.raises(RequestError):
        NatMethod(tools).apply(session)
    assert tools.runs[-1] == (list(RESTORE4), guard_removal_text(session, 4))


def test_removal_text() -> None:
    assert removal_text(jump_rules(make_session(forward=True), 4), [CHAIN]).splitlines() == [
        "*nat",
        f"-D OUTPUT -p tcp -m owner --uid-owner 1000 -j {CHAIN}",
        f"-D PREROUTING ! -d 127.0.0.0/8 -p tcp -j {CHAIN}",
        f"-F {CHAIN}",
        f"-X {CHAIN}",
        "COMMIT",
    ]


SAVED = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:SHUTTLE-aaaaaaaaaaaa - [0:0]
:SHUTTLE-bbbbbbbbbbbb - [0:0]
:SHUTTLE-by-hand - [0:0]
-A PREROUTING -p tcp -j SHUTTLE-aaaaaaaaaaaa
-A OUTPUT -p tcp -m owner --uid-owner 1000 -j SHUTTLE-aaaaaaaaaaaa
-A OUTPUT -m comment --comment "keep me" -j DOCKER
-A OUTPUT -p tcp -m owner --uid-owner 0 -m comment --comment "a b" -j SHUTTLE-bbbbbbbbbbbb
-A OUTPUT -j SHUTTLE-by-hand
-A SHUTTLE-aaaaaaaaaaaa -d 127.0.0.0/8 -j RETURN
-A SHUTTLE-aaaaaaaaaaaa -d 10.0.0.0/8 -p tcp -j REDIRECT --to-ports 12300
COMMIT
"""


def test_stale_rules_finds_only_our_chains_and_their_jumps() -> None:
    jumps, chains = stale_rules(SAVED)
    assert chains == ["SHUTTLE-aaaaaaaaaaaa", "SHUTTLE-bbbbbbbbbbbb"]
    assert jumps == [
        "PREROUTING -p tcp -j SHUTTLE-aaaaaaaaaaaa",
        "OUTPUT -p tcp -m owner --uid-owner 1000 -j SHUTTLE-aaaaaaaaaaaa",
        'OUTPUT -p tcp -m owner --uid-owner 0 -m comment --comment "a b" -j SHUTTLE-bbbbbbbbbbbb',
    ]


def test_stale_rules_of_a_clean_table() -> None:
    assert stale_rules("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j\nCOMMIT\n") == ([], [])


class FakeTools:
    """Records each tool run; fails the runs whose argv contains a given word."""

    def __init__(
        self,
        saved: dict[tuple[int, str], str] | None = None,
        fail: Sequence[str] = (),
        fail_text: str = "",
    ) -> None:
        self.runs: list[tuple[list[str], str]] = []
        self.saved = saved or {}  # by (IP version, table)
        self.fail = fail
        self.fail_text = fail_text  # fail the runs whose stdin contains it, too

    def __call__(self, argv: Sequence[str], stdin: str) -> str:
        self.runs.append((list(argv), stdin))
        if any(word in argv for word in self.fail) or (self.fail_text and self.fail_text in stdin):
            raise RequestError(f"{argv[0]} failed (exit 1): no")
        for version, tools in TOOLS.items():
            for table in ("nat", "filter"):
                if list(argv) == [*tools.save, "-t", table]:
                    return self.saved.get((version, table), f"*{table}\nCOMMIT\n")
        return ""


def test_apply_is_one_restore_per_version() -> None:
    tools = FakeTools()
    assert NatMethod(tools).apply(MIXED) == 7 + 6
    assert tools.runs == [
        (list(RESTORE4), apply_text(MIXED, 4)),
        (list(RESTORE6), apply_text(MIXED, 6)),
    ]
    assert RESTORE4 == ("iptables-restore", "-w", "--noflush")
    assert RESTORE6 == ("ip6tables-restore", "-w", "--noflush")


def test_apply_of_one_version_runs_one_tool() -> None:
    tools = FakeTools()
    session = make_session(["fd00:5e::/32"], ["10.0.0.0/8"])
    assert NatMethod(tools).apply(session) == 4
    assert [argv[0] for argv, _ in tools.runs] == ["ip6tables-restore"]


def test_apply_failure_is_the_callers_error() -> None:
    tools = FakeTools(fail=["iptables-restore"])
    with pytest.raises(RequestError, match="iptables-restore failed"):
        NatMethod(tools).apply(MIXED)
    assert len(tools.runs) == 1  # IPv6 not even tried


def test_a_failed_second_version_undoes_the_first() -> None:
    tools = FakeTools(fail=["ip6tables-restore"])
    with pytest.raises(RequestError, match="ip6tables-restore failed"):
        NatMethod(tools).apply(MIXED)
    assert tools.runs[-1] == (list(RESTORE4), removal_text(jump_rules(MIXED, 4), [CHAIN]))


def test_refill_text_declares_the_chain_and_leaves_the_jumps() -> None:
    # Declared, the chain is emptied first, in the same commit.
    assert refill_text(MIXED, 4).splitlines() == [
        "*nat",
        *apply_text(MIXED, 4).splitlines()[1:-2],
        "COMMIT",
    ]
    assert "OUTPUT" not in refill_text(MIXED, 6)


def targets(*items: str) -> tuple[Any, ...]:
    return tuple(map(make_target, items))


def test_an_update_of_the_same_versions_refills_each_chain() -> None:
    tools = FakeTools()
    new = make_session(["192.0.2.0/24", "fd00::/8"], ["192.0.2.7/32"])
    assert NatMethod(tools).update(MIXED, new.subnets, new.excludes) == 5 + 4
    assert tools.runs == [
        (list(RESTORE4), refill_text(new, 4)),
        (list(RESTORE6), refill_text(new, 6)),
    ]


def test_an_update_adds_and_drops_ip_versions() -> None:
    tools = FakeTools()
    ipv4 = make_session(["10.0.0.0/8"])
    NatMethod(tools).update(ipv4, targets("10.0.0.0/8", "fd00::/8"), ())
    both = make_session(["10.0.0.0/8", "fd00::/8"])
    assert tools.runs == [
        (list(RESTORE4), refill_text(both, 4)),
        (list(RESTORE6), apply_text(both, 6)),
    ]
    tools.runs.clear()
    assert NatMethod(tools).update(both, targets("fd00::/8"), ()) == 4
    only6 = make_session(["fd00::/8"])
    assert tools.runs == [
        (list(RESTORE4), removal_text(jump_rules(both, 4), [CHAIN])),
        (list(RESTORE6), refill_text(only6, 6)),
    ]


def test_a_failed_update_of_the_second_version_puts_the_first_back() -> None:
    tools = FakeTools(fail=["ip6tables-restore"])
    new = make_session(["192.0.2.0/24", "fd00::/8"])
    with pytest.raises(RequestError, match="ip6tables-restore failed"):
        NatMethod(tools).update(MIXED, new.subnets, new.excludes)
    assert tools.runs == [
        (list(RESTORE4), refill_text(new, 4)),
        (list(RESTORE6), refill_text(new, 6)),
        (list(RESTORE4), refill_text(MIXED, 4)),  # as it was
    ]


def test_remove_is_one_restore_per_version() -> None:
    tools = FakeTools()
    NatMethod(tools).remove(MIXED)
    assert tools.runs == [
        (list(RESTORE4), removal_text(jump_rules(MIXED, 4), [CHAIN])),
        (list(RESTORE6), removal_text(jump_rules(MIXED, 6), [CHAIN])),
    ]


def test_remove_falls_back_to_single_steps_that_each_get_their_turn() -> None:
    # The restore fails, and so does the -D (the jump is gone already): -F and -X still run.
    tools = FakeTools(fail=["--noflush", "-D"])
    NatMethod(tools).remove(make_session(["fd00::/8"]))
    ip6tables = ["ip6tables", "-w", "-t", "nat"]
    assert [argv for argv, _ in tools.runs[1:]] == [
        [
            *ip6tables,
            "-D",
            "OUTPUT",
            "-p",
            "tcp",
            "-m",
            "owner",
            "--uid-owner",
            "1000",
            "-j",
            CHAIN,
        ],
        [*ip6tables, "-F", CHAIN],
        [*ip6tables, "-X", CHAIN],
    ]


SAVED_FILTER = """\
*filter
:OUTPUT ACCEPT [0:0]
:SHUTTLE-aaaaaaaaaaaa - [0:0]
-A OUTPUT -d 127.0.0.0/8 -p tcp -j SHUTTLE-aaaaaaaaaaaa
-A OUTPUT -o lo -j ACCEPT
-A SHUTTLE-aaaaaaaaaaaa -p tcp -m tcp --dport 40123 -j REJECT --reject-with tcp-reset
COMMIT
"""


def test_remove_stale_in_both_versions_and_both_tables() -> None:
    saved = {
        (4, "nat"): SAVED,
        (6, "nat"): SAVED.replace("bbbbbbbbbbbb", "cccccccccccc"),
        (4, "filter"): SAVED_FILTER,  # a guard left behind
    }
    tools = FakeTools(saved=saved)
    assert NatMethod(tools).remove_stale() == 5
    assert [" ".join(argv[:3]) for argv, _ in tools.runs] == [
        "iptables-save -t nat",
        "iptables-restore -w --noflush",
        "iptables-save -t filter",
        "iptables-restore -w --noflush",
        "ip6tables-save -t nat",
        "ip6tables-restore -w --noflush",
        "ip6tables-save -t filter",
    ]
    assert tools.runs[1][1] == removal_text(*stale_rules(SAVED))
    assert tools.runs[3][1].splitlines() == [
        "*filter",
        "-D OUTPUT -d 127.0.0.0/8 -p tcp -j SHUTTLE-aaaaaaaaaaaa",
        "-F SHUTTLE-aaaaaaaaaaaa",
        "-X SHUTTLE-aaaaaaaaaaaa",
        "COMMIT",
    ]


def test_remove_stale_with_nothing_stale_changes_nothing() -> None:
    tools = FakeTools()
    assert NatMethod(tools).remove_stale() == 0
    assert [argv for argv, _ in tools.runs] == [
        [*TOOLS[version].save, "-t", table] for version in (4, 6) for table in ("nat", "filter")
    ]


def test_remove_stale_does_one_version_when_the_other_fails() -> None:
    tools = FakeTools(saved={(6, "nat"): SAVED}, fail=["iptables-save"])
    with pytest.raises(RequestError, match="iptables-save failed"):
        NatMethod(tools).remove_stale()
    assert [argv[0] for argv, _ in tools.runs] == [
        "iptables-save",
        "iptables-save",
        "ip6tables-save",
        "ip6tables-restore",
        "ip6tables-save",
    ]


# --- real daemon ---------------------------------------------------------------------


@pytest.mark.integration
def test_a_session_installs_its_chains_and_close_removes_exactly_them(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    daemon = start_firewalld()
    listen(12300, addresses=("127.0.0.1", "::1"))
    before4, before6 = nat_rules(netns), nat6_rules(netns)
    subnets = [("10.0.0.0/8", 1, 65535), ("192.0.2.0/24", 80, 90), ("fd00:5e::/32", 443, 443)]
    excludes = [("10.1.0.0/16", 1, 65535), ("fd00:5e:1::/48", 1, 1024)]
    client, method = open_session(daemon, "nat", 12300, subnets, excludes)
    try:
        assert method == "nat"
        assert client.session is not None
        chain = "SHUTTLE-" + client.session[:12]
        assert [line for line in nat_rules(netns) if line not in before4] == [
            f":{chain} - [0:0]",
            f"-A OUTPUT -p tcp -m owner --uid-owner 0 -j {chain}",
            f"-A {chain} -m addrtype --dst-type LOCAL -j RETURN",
            f"-A {chain} -d 127.0.0.0/8 -j RETURN",
            f"-A {chain} -d 10.1.0.0/16 -j RETURN",
            f"-A {chain} -d 10.0.0.0/8 -p tcp -j REDIRECT --to-ports 12300",
            f"-A {chain} -d 192.0.2.0/24 -p tcp -m tcp --dport 80:90 -j REDIRECT --to-ports 12300",
        ]
        assert [line for line in nat6_rules(netns) if line not in before6] == [
            f":{chain} - [0:0]",
            f"-A OUTPUT -p tcp -m owner --uid-owner 0 -j {chain}",
            f"-A {chain} -m addrtype --dst-type LOCAL -j RETURN",
            f"-A {chain} -d ::1/128 -j RETURN",
            f"-A {chain} -d fd00:5e:1::/48 -p tcp -m tcp --dport 1:1024 -j RETURN",
            f"-A {chain} -d fd00:5e::/32 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 12300",
        ]
    finally:
        close_session(client)
    assert (nat_rules(netns), nat6_rules(netns)) == (before4, before6)
    assert f"session {chain[8:]} of uid 0 closed by uid 0: 11 nat rules removed" in daemon.log


@pytest.mark.integration
@pytest.mark.parametrize("side", ["excludes", "subnets"])
def test_ten_thousand_subnets(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener], side: str
) -> None:
    daemon = start_firewalld(lease=30)
    listen(12300)
    many = [(f"10.{i // 250}.{i % 250}.1/32", 1, 65535) for i in range(10_000)]
    one = [("10.0.0.0/8", 1, 65535)] if side == "excludes" else [("192.0.2.0/24", 1, 65535)]
    subnets, excludes = (one, many) if side == "excludes" else (many, one)
    client, _ = open_session(daemon, "nat", 12300, subnets, excludes)
    try:
        rules = shuttle_rules(netns)
        # The chain, the jump, local and loopback RETURNs, the one, and the 10,000.
        assert len(rules) == 10_005
        action = "RETURN" if side == "excludes" else "REDIRECT --to-ports 12300"
        assert sum(line.startswith("-A SHUTTLE-") and action in line for line in rules) == (
            10_000 + 2 * (side == "excludes")
        )
    finally:
        close_session(client)
    assert nothing_of_shuttle(netns)


@pytest.mark.integration
def test_stale_chains_of_both_versions_go_at_start_and_only_they(
    netns: str, start_firewalld: Callable[..., Daemon]
) -> None:
    for tool in ("iptables-restore", "ip6tables-restore"):
        subprocess.run(
            ["ip", "netns", "exec", netns, tool, "-w", "--noflush"],
            input="*nat\n:SHUTTLE-0123456789ab - [0:0]\n:MINE - [0:0]\n"
            "-A OUTPUT -p tcp -j SHUTTLE-0123456789ab\n-A PREROUTING -p tcp -j MINE\nCOMMIT\n"
            # And a guard's (the filter table's), which goes as well.
            "*filter\n:SHUTTLE-0123456789ab - [0:0]\n-A OUTPUT -p tcp -j SHUTTLE-0123456789ab\n"
            "COMMIT\n",
            text=True,
            check=True,
            timeout=10,
        )
    daemon = start_firewalld()
    assert shuttle_rules(netns) == []
    for rules in (nat_rules(netns), nat6_rules(netns)):
        assert "-A PREROUTING -p tcp -j MINE" in rules
    assert "removed 1 stale IPv4 nat chains left by an earlier run" in daemon.log
    assert "removed 1 stale IPv6 nat chains left by an earlier run" in daemon.log
    assert "removed 1 stale IPv4 filter chains left by an earlier run" in daemon.log
    assert "removed 1 stale IPv6 filter chains left by an earlier run" in daemon.log


@pytest.mark.integration
def test_an_update_rebuilds_exactly_the_sessions_chains(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    daemon = start_firewalld(lease=30)
    listen(12300, addresses=("127.0.0.1", "::1"))
    other, _ = open_session(daemon, "nat", 12300, [("198.51.100.0/24", 1, 65535)], [])
    client, _ = open_session(daemon, "nat", 12300, [("10.0.0.0/8", 1, 65535)], [])
    try:
        assert other.session is not None and client.session is not None
        chain = "SHUTTLE-" + client.session[:12]
        theirs = [line for line in shuttle_rules(netns) if chain not in line]
        rules = update_session(
            client,
            [("192.0.2.0/24", 80, 90), ("fd00:5e::/32", 443, 443)],
            [("192.0.2.7/32", 1, 65535)],
        )
        assert rules == 5 + 4
        ours = [line for line in shuttle_rules(netns) if chain in line]
        assert ours == [
            f":{chain} - [0:0]",
            f"-A OUTPUT -p tcp -m owner --uid-owner 0 -j {chain}",
            f"-A {chain} -m addrtype --dst-type LOCAL -j RETURN",
            f"-A {chain} -d 127.0.0.0/8 -j RETURN",
            f"-A {chain} -d 192.0.2.7/32 -j RETURN",
            f"-A {chain} -d 192.0.2.0/24 -p tcp -m tcp --dport 80:90 -j REDIRECT --to-ports 12300",
            f":{chain} - [0:0]",
            f"-A OUTPUT -p tcp -m owner --uid-owner 0 -j {chain}",
            f"-A {chain} -m addrtype --dst-type LOCAL -j RETURN",
            f"-A {chain} -d ::1/128 -j RETURN",
            f"-A {chain} -d fd00:5e::/32 -p tcp -m tcp --dport 443 -j REDIRECT --to-ports 12300",
        ]
        # The other session's chain is untouched.
        assert [line for line in shuttle_rules(netns) if chain not in line] == theirs
        # Back to IPv4 only: the IPv6 chain and its jump go.
        assert update_session(client, [("10.0.0.0/8", 1, 65535)], []) == 4
        assert [line for line in nat6_rules(netns) if chain in line] == []
        assert f"-A {chain} -d 10.0.0.0/8 -p tcp -j REDIRECT --to-ports 12300" in nat_rules(netns)
    finally:
        close_session(client)
        close_session(other)
    assert nothing_of_shuttle(netns)


@pytest.mark.integration
def test_an_update_that_fails_halfway_leaves_the_rules_as_they_were(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    daemon = start_firewalld(lease=30)
    listen(12300, addresses=("127.0.0.1", "::1"))
    subnets = [("10.0.0.0/8", 1, 65535), ("fd00:5e::/32", 1, 65535)]
    client, _ = open_session(daemon, "nat", 12300, subnets, [])
    try:
        assert client.session is not None
        chain = "SHUTTLE-" + client.session[:12]
        # Someone removes the IPv6 jump: dropping IPv6 now fails, after IPv4 was refilled.
        in_netns(
            netns,
            "ip6tables",
            "-w",
            "-t",
            "nat",
            "-D",
            "OUTPUT",
            "-p",
            "tcp",
            "-m",
            "owner",
            "--uid-owner",
            "0",
            "-j",
            chain,
        )
        before = shuttle_rules(netns)
        with pytest.raises(FirewallError, match=r"^shuttle-firewalld: ip6tables-restore failed"):
            update_session(client, [("192.0.2.0/24", 1, 65535)], [])
        assert shuttle_rules(netns) == before
        [entry] = asyncio.run(client.list_sessions())
        assert entry.subnets == 2
    finally:
        close_session(client)
    assert nothing_of_shuttle(netns)

"""The nft method: the exact ruleset text, what it runs when; then real tables in a namespace."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.methods.nft import (
    LIST_TABLES,
    NFT,
    PROBE,
    NftMethod,
    chains,
    replace_text,
    ruleset,
    stale_tables,
    table_name,
)

from firewalld.captures import (
    close_session,
    open_session,
    update_session,
)
from firewalld.daemon import (
    Daemon,
    Listener,
    nft,
    nft_set_sizes,
    nothing_of_shuttle,
    shuttle_tables,
)
from firewalld.fakes import make_session, make_shortcut, make_target

TABLE = "shuttle-0123456789ab"


def test_table_name() -> None:
    assert table_name(make_session()) == TABLE


def test_ruleset_ipv4_own_traffic() -> None:
    text = ruleset(make_session(["10.0.0.0/8"], ["10.1.0.0/16"]))
    assert (
        text
        == f"""\
create table inet {TABLE}
table inet {TABLE} {{
\tset exclude4 {{
\t\ttype ipv4_addr . inet_service
\t\tflags interval
\t\telements = {{
\t\t\t10.1.0.0/16 . 1-65535
\t\t}}
\t}}
\tset include4 {{
\t\ttype ipv4_addr . inet_service
\t\tflags interval
\t\telements = {{
\t\t\t10.0.0.0/8 . 1-65535
\t\t}}
\t}}
\tchain output {{
\t\ttype nat hook output priority -100; policy accept;
\t\tfib daddr type local return
\t\tip daddr 127.0.0.0/8 return
\t\tip daddr . tcp dport @exclude4 return
\t\tmeta skuid 1000 ip daddr . tcp dport @include4 redirect to :12300
\t}}
}}
"""
    )


def set_elements(text: str, name: str) -> list[str]:
    """The element lines of one set in a ruleset text; [] for a set without elements."""
    lines = text.splitlines()
    start = lines.index(f"\tset {name} {{")
    end = lines.index("\t}", start)
    body = lines[start + 1 : end]
    if "\t\telements = {" not in body:
        return []
    first = body.index("\t\telements = {") + 1
    return [line.strip().rstrip(",") for line in body[first : body.index("\t\t}")]]


def chain_rules(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"\tchain {name} {{")
    return [line.strip() for line in lines[start + 1 : lines.index("\t}", start)]]


def test_ruleset_both_versions_with_ports() -> None:
    text = ruleset(
        make_session(
            ["10.0.0.0/8", ("192.0.2.0/24", 80, 90), ("fd00:5e::/32", 443, 443), "2001:db8::/48"],
            [("10.1.2.3/32", 22, 22), "198.18.0.0/15", ("fd00:5e:1::/48", 443, 443)],
        )
    )
    assert set_elements(text, "include4") == ["10.0.0.0/8 . 1-65535", "192.0.2.0/24 . 80-90"]
    assert set_elements(text, "exclude4") == ["10.1.2.3 . 22", "198.18.0.0/15 . 1-65535"]
    assert set_elements(text, "include6") == ["2001:db8::/48 . 1-65535", "fd00:5e::/32 . 443"]
    assert set_elements(text, "exclude6") == ["fd00:5e:1::/48 . 443"]
    assert "\t\ttype ipv6_addr . inet_service" in text
    assert chain_rules(text, "output") == [
        "type nat hook output priority -100; policy accept;",
        "fib daddr type local return",
        "ip daddr 127.0.0.0/8 return",
        "ip daddr . tcp dport @exclude4 return",
        "meta skuid 1000 ip daddr . tcp dport @include4 redirect to :12300",
        "ip6 daddr ::1 return",
        "ip6 daddr . tcp dport @exclude6 return",
        "meta skuid 1000 ip6 daddr . tcp dport @include6 redirect to :12300",
    ]
    assert "prerouting" not in text


def test_ruleset_ipv6_only_ignores_ipv4_excludes() -> None:
    text = ruleset(make_session(["fd00:5e::/32"], ["10.0.0.0/8", "fd00:5e::5/128"]))
    for ipv4_only in ("exclude4", "include4", "ipv4_addr", "ip daddr", "10.0.0.0"):
        assert ipv4_only not in text
    assert set_elements(text, "exclude6") == ["fd00:5e::5 . 1-65535"]
    assert chain_rules(text, "output")[1:] == [
        "fib daddr type local return",
        "ip6 daddr ::1 return",
        "ip6 daddr . tcp dport @exclude6 return",
        "meta skuid 1000 ip6 daddr . tcp dport @include6 redirect to :12300",
    ]


def test_an_empty_set_has_no_elements_line() -> None:
    text = ruleset(make_session(["10.0.0.0/8"], []))
    assert set_elements(text, "exclude4") == []
    assert "elements = { }" not in text


def test_overlapping_targets_become_disjoint_elements() -> None:
    # The kernel would refuse 10.1.2.3 . 80 beside 10.0.0.0/8 . 1-65535 ("File exists").
    text = ruleset(
        make_session(
            [
                "10.0.0.0/8",
                ("10.1.2.3/32", 80, 80),
                ("192.0.2.0/24", 80, 90),
                ("192.0.2.0/25", 85, 99),
            ]
        )
    )
    assert set_elements(text, "include4") == [
        "10.0.0.0/8 . 1-65535",
        "192.0.2.0/25 . 80-99",
        "192.0.2.128/25 . 80-90",
    ]


@pytest.mark.parametrize(
    ("uid", "gid", "owner"),
    [
        (1000, -1, "meta skuid 1000 "),
        (-1, -1, ""),
        (-1, 100, "meta skgid 100 "),
        (1000, 100, "meta skuid 1000 meta skgid 100 "),
        (0, -1, "meta skuid 0 "),
    ],
)
def test_owner_match(uid: int, gid: int, owner: str) -> None:
    text = ruleset(make_session(uid=uid, gid=gid))
    assert chain_rules(text, "output")[-1] == (
        f"{owner}ip daddr . tcp dport @include4 redirect to :12300"
    )
    assert text.count("meta sk") == owner.count("meta sk")  # only on the redirect


def test_forward_adds_a_prerouting_chain_without_owner_match() -> None:
    text = ruleset(make_session(["10.0.0.0/8", "fd00:5e::/32"], forward=True))
    assert chain_rules(text, "prerouting") == [
        "type nat hook prerouting priority dstnat; policy accept;",
        "fib daddr type local return",
        "ip daddr 127.0.0.0/8 return",
        "ip daddr . tcp dport @exclude4 return",
        "ip daddr . tcp dport @include4 redirect to :12300",
        "ip6 daddr ::1 return",
        "ip6 daddr . tcp dport @exclude6 return",
        "ip6 daddr . tcp dport @include6 redirect to :12300",
    ]
    assert "meta skuid 1000" in "\n".join(chain_rules(text, "output"))


def test_the_rule_count_does_not_grow_with_the_subnets() -> None:
    few = ruleset(make_session(["10.0.0.0/8"], ["10.1.0.0/16"]))
    many = ruleset(
        make_session([f"10.{i}.0.0/16" for i in range(200)], [f"10.0.{i}.0/24" for i in range(200)])
    )
    assert chain_rules(few, "output") == chain_rules(many, "output")
    assert len(set_elements(many, "include4")) == 1  # 10.0.0.0/16 ... 10.199.0.0/16 joined
    assert len(set_elements(many, "exclude4")) == 1


DNS = ("10.53.0.53", "127.0.0.53", "fd00:53::53")


def test_nameservers_come_first_in_every_chain() -> None:
    text = ruleset(make_session(["10.0.0.0/8"], ["10.53.0.0/16"], dns=DNS))
    assert chain_rules(text, "output")[1:4] == [
        "meta l4proto { tcp, udp } meta skuid 1000 ip daddr { 10.53.0.53, 127.0.0.53 } "
        "th dport 53 redirect to :12300",
        "meta l4proto { tcp, udp } meta skuid 1000 ip6 daddr { fd00:53::53 } "
        "th dport 53 redirect to :12300",
        "fib daddr type local return",
    ]
    # An IPv6 nameserver brings the IPv6 sets and rules, with no IPv6 subnet.
    assert set_elements(text, "include6") == []
    assert chain_rules(text, "output")[-1] == (
        "meta skuid 1000 ip6 daddr . tcp dport @include6 redirect to :12300"
    )


def test_forwarded_dns_to_a_loopback_nameserver_is_not_captured() -> None:
    text = ruleset(make_session(["10.0.0.0/8"], dns=DNS, forward=True))
    assert chain_rules(text, "prerouting")[1:4] == [
        "meta l4proto { tcp, udp } ip daddr { 10.53.0.53 } th dport 53 redirect to :12300",
        "meta l4proto { tcp, udp } ip6 daddr { fd00:53::53 } th dport 53 redirect to :12300",
        "fib daddr type local return",
    ]
    only_loopback = ruleset(make_session(["10.0.0.0/8"], dns=["127.0.0.53"], forward=True))
    assert chain_rules(only_loopback, "prerouting")[1] == "fib daddr type local return"


def test_a_sessions_bypass_sockets_skip_only_its_dns_capture_and_only_locally() -> None:
    session = make_session(["10.0.0.0/8"], dns=DNS, forward=True)
    session.bypass_mark = 0x53484001
    text = ruleset(session)
    nameservers4 = "ip daddr { 10.53.0.53, 127.0.0.53 } th dport 53"
    assert chain_rules(text, "output")[1:3] == [
        f"meta l4proto {{ tcp, udp }} meta mark 0x53484001 meta skuid 1000 {nameservers4} return",
        f"meta l4proto {{ tcp, udp }} meta skuid 1000 {nameservers4} redirect to :12300",
    ]
    assert text.count("0x53484001") == 2  # IPv4 and IPv6 in output; prerouting has none
    assert "mark" not in "\n".join(chain_rules(text, "prerouting"))


def test_shortcuts_sit_between_a_versions_returns_and_its_capture_in_output_only() -> None:
    session = make_session(["10.0.0.0/8", "fd00:5e::/32"], forward=True)
    session.shortcuts = (
        make_shortcut("10.1.0.2", 7007, 40123),
        make_shortcut("fd00:5e::5", 443, 40124, limit=1),
        make_shortcut("10.1.0.3", 7007, 40125),
    )
    text = ruleset(session)
    assert chain_rules(text, "output")[2:] == [
        "ip daddr 127.0.0.0/8 return",
        "ip daddr . tcp dport @exclude4 return",
        "meta skuid 1000 ip daddr 10.1.0.2 tcp dport 7007 ct count 200 redirect to :40123",
        "meta skuid 1000 ip daddr 10.1.0.3 tcp dport 7007 ct count 200 redirect to :40125",
        "meta skuid 1000 ip daddr . tcp dport @include4 redirect to :12300",
        "ip6 daddr ::1 return",
        "ip6 daddr . tcp dport @exclude6 return",
        "meta skuid 1000 ip6 daddr fd00:5e::5 tcp dport 443 ct count 1 redirect to :40124",
        "meta skuid 1000 ip6 daddr . tcp dport @include6 redirect to :12300",
    ]
    # Forwarded connections would land on the incoming interface's address: not there.
    assert "ct count" not in "\n".join(chain_rules(text, "prerouting"))
    assert NftMethod(FakeNft()).apply(session) == 14 + 3 + 3  # and the guard's three


SYN = "tcp flags & (fin | syn | rst | ack) == syn"


@pytest.mark.parametrize(
    ("uid", "gid", "others"),
    [
        (1000, -1, ["meta skuid != 1000"]),
        (-1, 100, ["meta skgid != 100"]),
        # Either mismatch resets: two rules, not one rule of both.
        (1000, 100, ["meta skuid != 1000", "meta skgid != 100"]),
    ],
)
def test_the_guard_resets_other_owners_syns_to_each_local_port(
    uid: int, gid: int, others: list[str]
) -> None:
    session = make_session(["10.0.0.0/8", "fd00:5e::/32"], uid=uid, gid=gid)
    session.shortcuts = (
        make_shortcut("10.1.0.2", 7007, 40123),
        make_shortcut("fd00:5e::5", 443, 40124),
    )
    text = ruleset(session)
    # After the nat output chain (-100): it sees the redirected SYN's new destination.
    assert "\t\ttype filter hook output priority filter; policy accept;" in text
    assert chain_rules(text, "guard")[1:] == [
        *(f"ip daddr 127.0.0.0/8 tcp dport 40123 {SYN} {o} reject with tcp reset" for o in others),
        *(f"ip6 daddr ::1 tcp dport 40124 {SYN} {o} reject with tcp reset" for o in others),
    ]


def test_no_guard_without_an_owner_match_or_without_shortcuts() -> None:
    everybody = make_session(uid=-1)
    everybody.shortcuts = (make_shortcut("10.1.0.2", 7007, 40123),)
    assert "ct count" in ruleset(everybody)  # its shortcut, unguarded: every uid goes there
    assert "chain guard" not in ruleset(everybody)
    assert "chain guard" not in ruleset(make_session())


def test_an_update_writes_the_shortcuts_it_is_given() -> None:
    nft_runs = FakeNft()
    session = make_session()
    session.shortcuts = (make_shortcut("10.1.0.2", 7007, 40123),)
    method = NftMethod(nft_runs)
    assert method.update(session, session.subnets, ()) == 6  # None: the session's own
    assert "ct count 200 redirect to :40123" in nft_runs.runs[-1][1]
    assert "tcp dport 40123 " in chain_rules(nft_runs.runs[-1][1], "guard")[1]
    assert method.update(session, session.subnets, (), ()) == 4
    assert "ct count" not in nft_runs.runs[-1][1]
    assert "chain guard" not in nft_runs.runs[-1][1]


class FakeNft:
    """Records each nft run; fails runs whose stdin contains a given text."""

    def __init__(self, listing: str = "", fail: Sequence[str] = ()) -> None:
        self.runs: list[tuple[list[str], str]] = []
        self.listing = listing
        self.fail = fail

    def __call__(self, argv: Sequence[str], stdin: str) -> str:
        self.runs.append((list(argv), stdin))
        if any(text in stdin for text in self.fail):
            raise RequestError("nft failed (exit 1): Error: No such file or directory")
        return self.listing if tuple(argv) == LIST_TABLES else ""


def test_apply_is_one_nft_run_and_counts_rules() -> None:
    nft_runs = FakeNft()
    method = NftMethod(nft_runs)
    assert method.apply(make_session()) == 4
    assert nft_runs.runs == [(["nft", "-f", "-"], ruleset(make_session()))]
    assert method.apply(make_session(["10.0.0.0/8", "fd00::/8"])) == 7
    assert method.apply(make_session(["10.0.0.0/8", "fd00::/8"], forward=True)) == 14
    assert method.apply(make_session(["10.0.0.0/8"], dns=["10.53.0.53", "::1"])) == 9


def test_apply_failure_is_the_callers_error() -> None:
    with pytest.raises(RequestError, match="nft failed"):
        NftMethod(FakeNft(fail=["create table"])).apply(make_session())


def test_replace_text_deletes_and_recreates_the_table_in_one_script() -> None:
    session = make_session(["10.0.0.0/8", "fd00::/8"])
    assert replace_text(session, chains(session)) == (
        f"delete table inet {TABLE}\n" + ruleset(session)
    )


def test_update_is_one_nft_run_with_the_new_targets() -> None:
    nft_runs = FakeNft()
    session = make_session(["10.0.0.0/8"], ["10.1.0.0/16"])
    subnets = tuple(map(make_target, ["192.0.2.0/24", "fd00::/8"]))
    assert NftMethod(nft_runs).update(session, subnets, ()) == 7  # one IPv6 chain's worth more
    [(argv, script)] = nft_runs.runs
    assert argv == list(NFT)
    assert script == f"delete table inet {TABLE}\n" + ruleset(
        make_session(["192.0.2.0/24", "fd00::/8"])
    )
    assert set_elements(script, "include4") == ["192.0.2.0/24 . 1-65535"]
    assert set_elements(script, "exclude4") == []
    # The session keeps its old targets: Sessions sets the new ones once this succeeded.
    assert [str(target) for target in session.subnets] == ["10.0.0.0/8"]


def test_update_failure_is_the_callers_error() -> None:
    with pytest.raises(RequestError, match="nft failed"):
        NftMethod(FakeNft(fail=["delete table"])).update(
            make_session(), (make_target("192.0.2.0/24"),), ()
        )


def test_remove_deletes_the_table_and_never_raises() -> None:
    nft_runs = FakeNft(fail=["delete"])
    NftMethod(nft_runs).remove(make_session())
    assert nft_runs.runs == [(list(NFT), f"delete table inet {TABLE}\n")]


LISTING = """\
table ip nat
table inet shuttle-aaaaaaaaaaaa
table inet mine
table ip shuttle-bbbbbbbbbbbb
table inet shuttle-cccccccccccc
table inet shuttle-by-hand
table inet shuttle-probe
table inet shuttle-dddddddddddd-x
"""


def test_stale_tables_are_only_ours() -> None:
    assert stale_tables(LISTING) == [
        "shuttle-aaaaaaaaaaaa",
        "shuttle-cccccccccccc",
        "shuttle-probe",
    ]
    assert stale_tables("") == []


def test_remove_stale_is_one_run() -> None:
    nft_runs = FakeNft(LISTING)
    assert NftMethod(nft_runs).remove_stale() == 3
    assert nft_runs.runs == [
        (list(LIST_TABLES), ""),
        (
            list(NFT),
            "delete table inet shuttle-aaaaaaaaaaaa\n"
            "delete table inet shuttle-cccccccccccc\n"
            "delete table inet shuttle-probe\n",
        ),
    ]


def test_remove_stale_falls_back_to_one_table_at_a_time() -> None:
    nft_runs = FakeNft(LISTING, fail=["shuttle-aaaaaaaaaaaa"])
    assert NftMethod(nft_runs).remove_stale() == 3
    assert [stdin for _, stdin in nft_runs.runs[2:]] == [
        "delete table inet shuttle-aaaaaaaaaaaa\n",
        "delete table inet shuttle-cccccccccccc\n",
        "delete table inet shuttle-probe\n",
    ]


def test_remove_stale_with_nothing_stale_changes_nothing() -> None:
    nft_runs = FakeNft("table ip nat\n")
    assert NftMethod(nft_runs).remove_stale() == 0
    assert nft_runs.runs == [(list(LIST_TABLES), "")]


def test_probe_creates_and_deletes_a_table() -> None:
    nft_runs = FakeNft()
    assert NftMethod(nft_runs).probe() is None
    assert nft_runs.runs == [(list(NFT), PROBE), (list(NFT), "delete table inet shuttle-probe\n")]


def test_probe_says_why_nft_does_not_work() -> None:
    assert NftMethod(FakeNft(fail=["probe4"])).probe() == (
        "nft failed (exit 1): Error: No such file or directory"
    )


# --- real daemon ---------------------------------------------------------------------


@pytest.mark.integration
def test_a_session_installs_its_table_and_close_removes_exactly_it(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    nft(netns, "add", "table", "inet", "mine")
    daemon = start_firewalld()
    listen(12300, addresses=("127.0.0.1", "::1"))
    subnets = [("10.0.0.0/8", 1, 65535), ("192.0.2.0/24", 80, 90), ("fd00:5e::/32", 443, 443)]
    excludes = [("10.1.0.0/16", 1, 65535), ("fd00:5e:1::/48", 1, 65535)]
    client, method = open_session(daemon, "nft", 12300, subnets, excludes)
    try:
        assert method == "nft"
        assert client.session is not None
        table = "shuttle-" + client.session[:12]
        assert shuttle_tables(netns) == [table]
        listing = nft(netns, "list", "table", "inet", table)
        for line in [
            "elements = { 10.0.0.0/8 . 1-65535,",
            "192.0.2.0/24 . 80-90 }",
            "elements = { 10.1.0.0/16 . 1-65535 }",
            "elements = { fd00:5e::/32 . 443 }",
            "elements = { fd00:5e:1::/48 . 1-65535 }",
            "type nat hook output priority -100; policy accept;",
            "meta skuid 0 ip daddr . tcp dport @include4 redirect to :12300",
            "meta skuid 0 ip6 daddr . tcp dport @include6 redirect to :12300",
            "ip6 daddr . tcp dport @exclude6 return",
        ]:
            assert line in listing, listing
    finally:
        close_session(client)
    assert shuttle_tables(netns) == []
    assert "table inet mine" in nft(netns, "list", "tables")
    assert "closed by uid 0: 7 nft rules removed" in daemon.log


@pytest.mark.integration
@pytest.mark.parametrize("method", ["nft", "tproxy"])  # tproxy builds on the same sets
@pytest.mark.parametrize("side", ["excludes", "subnets"])
def test_ten_thousand_subnets_are_one_set(
    netns: str,
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
    side: str,
    method: str,
) -> None:
    daemon = start_firewalld(lease=30)
    listen(12300)
    # /32s that are not neighbours, so that no two join into one element.
    many = [(f"10.{i // 250}.{i % 250}.1/32", 1, 65535) for i in range(10_000)]
    one = [("10.0.0.0/8", 1, 65535)] if side == "excludes" else [("192.0.2.0/24", 1, 65535)]
    subnets, excludes = (one, many) if side == "excludes" else (many, one)
    client, _ = open_session(daemon, method, 12300, subnets, excludes)
    try:
        assert client.session is not None
        table = "shuttle-" + client.session[:12]
        sizes = nft_set_sizes(netns, table)
        assert sizes == {
            "exclude4": 10_000 if side == "excludes" else 1,
            "include4": 1 if side == "excludes" else 10_000,
            # tproxy: the flows its reply sockets answer, none yet
            **({"flows4": 0, "flows6": 0} if method == "tproxy" else {}),
        }
        assert nft(netns, "list", "chain", "inet", table, "output").count("\n") < 12
    finally:
        close_session(client)
    assert nothing_of_shuttle(netns)


@pytest.mark.integration
def test_stale_tables_go_at_start_and_only_they(
    netns: str, start_firewalld: Callable[..., Daemon]
) -> None:
    for table in ("shuttle-0123456789ab", "shuttle-probe", "shuttle-mine", "mine"):
        nft(netns, "add", "table", "inet", table)
    daemon = start_firewalld()
    assert nft(netns, "list", "tables").splitlines() == [
        "table inet shuttle-mine",
        "table inet mine",
    ]
    assert "removed 2 stale nft tables left by an earlier run" in daemon.log
    assert "method auto means nft" in daemon.log


@pytest.mark.integration
def test_an_update_swaps_the_sets_and_close_removes_the_table(
    netns: str, start_firewalld: Callable[..., Daemon], listen: Callable[..., Listener]
) -> None:
    daemon = start_firewalld(lease=30)
    listen(12300, addresses=("127.0.0.1", "::1"))
    client, _ = open_session(daemon, "nft", 12300, [("10.0.0.0/8", 1, 65535)], [])
    try:
        assert client.session is not None
        table = "shuttle-" + client.session[:12]
        assert nft_set_sizes(netns, table) == {"exclude4": 0, "include4": 1}
        # A new IP version brings its sets and rules; the old subnet goes.
        subnets = [
            ("192.0.2.0/24", 80, 90),
            ("198.18.0.0/15", 1, 65535),
            ("fd00:5e::/32", 443, 443),
        ]
        excludes = [("192.0.2.7/32", 1, 65535), ("fd00:5e:1::/48", 1, 65535)]
        assert update_session(client, subnets, excludes) == 7
        assert shuttle_tables(netns) == [table]
        assert nft_set_sizes(netns, table) == {
            "exclude4": 1,
            "include4": 2,
            "exclude6": 1,
            "include6": 1,
        }
        listing = nft(netns, "list", "table", "inet", table)
        assert "10.0.0.0/8" not in listing
        for line in [
            "elements = { 192.0.2.0/24 . 80-90,",
            "elements = { fd00:5e::/32 . 443 }",
            "meta skuid 0 ip6 daddr . tcp dport @include6 redirect to :12300",
        ]:
            assert line in listing, listing
        # And goes again.
        assert update_session(client, [("10.0.0.0/8", 1, 65535)], []) == 4
        assert nft_set_sizes(netns, table) == {"exclude4": 0, "include4": 1}
        assert "updated: 1 subnets, 0 excludes, 4 nft rules" in daemon.log
    finally:
        close_session(client)
    assert shuttle_tables(netns) == []

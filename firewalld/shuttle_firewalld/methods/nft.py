"""The nft method: one nftables table per session, its subnets in sets, so a constant number
of rules whatever the number of subnets. Applied with one `nft -f -` (one kernel transaction),
updated with another that deletes and recreates the table, and removed with one `delete table`.

Each IP version captured gets two sets, exclude4/include4 (exclude6/include6), typed as the
concatenation `ipv4_addr . inet_service` with the interval flag: one lookup matches address
and port range together, so `10.0.0.0/8` on every port and `192.0.2.7` on ports 80-90 sit in
the same set and one rule serves both. The kernel keeps such sets in nft_set_pipapo, which
refuses overlapping elements, so the elements come from targets.disjoint.

REDIRECT in the output hook rewrites locally generated packets to the loopback address
(nf_nat_redirect: 127.0.0.1, or ::1 for IPv6), whatever the destination was: that is why the
client listens there. In the prerouting hook (forward) it rewrites to the address of the
interface the packet came in on, so a forwarding session needs a wildcard listener.

A session's nameservers get one rule per IP version at the top of each chain: TCP and UDP
to port 53 of those addresses are redirected to the same port (the caller's UDP socket takes
the datagrams; conntrack turns the source of its answers back into the nameserver's). In
the output chain, one rule before it lets the session's bypass sockets through (bypass.py).

A session's shortcuts (SetShortcutsRequest) are rules of the output chain only, after a
version's returns and before its capture rule: `ct count N redirect to :LOCAL` sends the
owner's new connection to one destination into the caller's loopback port LOCAL (an ssh
forward's) while at most N connections through that rule are open, this one included; the
next falls through to the capture rule, into the session's port. The count is the rule's
own (nft_connlimit): it holds every connection that reached the expression, the ones it
let fall through included, and forgets one once conntrack has it closed (TIME_WAIT counts as
closed), but lazily: nf_conncount looks for closed ones when a connection is added, at most
once a jiffy. So the count is never below the connections open (ssh's listener never holds
more than N), and may be above it for a few milliseconds, when the next ones take the
session's port: they still arrive, the slower way. Tried here (nft 1.0.6, Linux 6.18,
HZ=250): with `ct count 1`, a first connection held open went to LOCAL, a second to the
session's port, and after both closed and a pause the next went to LOCAL again; 500
sequential connections (9,000 a second, each closed before the next) with `ct count 2`:
28 went to LOCAL; 3,000 with `ct count 200`: all of them. Not in the prerouting chain: a
redirect there lands on the incoming interface's address, where the forward does not listen.

ssh's forward accepts a connection from any local user, and forwards it as the session's
owner. So a session with an owner match and shortcuts has one more chain, `guard` (filter
output, priority 0: after the nat output chain at -100, so the owner's redirected SYN is
seen with its new destination, 127.0.0.1:LOCAL or [::1]:LOCAL): for each shortcut, the
opening SYN to LOCAL on loopback from a socket of another uid (`meta skuid != U`), or of
another gid where the session names one (`meta skgid != G`, a rule of its own: either
mismatch is enough), gets a TCP reset. The owner's connections, redirected or direct, pass.
A session that captures every user's traffic has no guard: it sends them all there anyway.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from shuttle_protocol.firewall_messages import ANY_OWNER

from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.prepared import Targets, nft_elements
from shuttle_firewalld.session import Session, Shortcut
from shuttle_firewalld.targets import DNS_PORT, LOOPBACK

from .base import guarded_owners, with_targets
from .tools import Runner, run_tool

log = logging.getLogger(__name__)

NFT = ("nft", "-f", "-")  # the script on stdin: one transaction, all of it or nothing
LIST_TABLES = ("nft", "list", "tables")
TABLE_PREFIX = "shuttle-"
# Only tables we could have made: the prefix and a short session id, 12 hex digits.
_OUR_TABLE_LINE = re.compile(r"table inet (shuttle-[0-9a-f]{12})")
PROBE_TABLE = "shuttle-probe"
ADDRESS_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
MATCH = {4: "ip daddr", 6: "ip6 daddr"}
LOOPBACK_TEXT = {4: "127.0.0.0/8", 6: "::1"}
# TCP and UDP alike; with it, `th dport` reads the destination port of either, and redirect
# and tproxy take it as the transport protocol they need.
L4 = "meta l4proto { tcp, udp }"


def table_name(session: Session) -> str:
    return TABLE_PREFIX + session.short_id


def set_text(name: str, version: int, elements: str) -> list[str]:
    """A set's lines, with its elements' lines (prepared.nft_elements)."""
    lines = [
        f"\tset {name} {{",
        f"\t\ttype {ADDRESS_TYPE[version]} . inet_service",
        "\t\tflags interval",
    ]
    if elements:  # an empty set has no elements line: `elements = { }` does not parse
        lines += ["\t\telements = {", elements, "\t\t}"]
    return [*lines, "\t}"]


def skip_rules(version: int, dport: str) -> list[str]:
    """The rules before a version's capture rule: what is never captured, then excludes.

    dport: how the destination port is matched ("tcp dport", or "th dport" for both TCP and
    UDP, which reads the same header bytes of any protocol).
    """
    return [
        # Loopback, always: the redirect itself goes there.
        f"{MATCH[version]} {LOOPBACK_TEXT[version]} return",
        # Excludes are matched first, so they win over any include they overlap.
        f"{MATCH[version]} . {dport} @exclude{version} return",
    ]


def include_match(version: int, dport: str) -> str:
    """The match of the version's captured destinations (address and port together)."""
    return f"{MATCH[version]} . {dport} @include{version}"


# The host's own addresses are never captured: a connection to this host is not for the
# tunnel (and for a router, its own services stay reachable).
LOCAL_RETURN = "fib daddr type local return"


def dns_rules(
    session: Session,
    version: int,
    owner: str,
    action: str,
    forwarded: bool = False,
    *,
    bypass: bool = True,
) -> list[str]:
    """The rules that capture DNS (TCP and UDP port 53) to the session's nameservers of this
    IP version, if it has any; action: what the rule does with such a packet. Before it,
    the packets of the session's bypass sockets return (bypass.py), unless bypass is False.

    Such rules come first in a chain, before any return: the common nameserver is a local
    stub resolver (127.0.0.53, 127.0.0.1), which the loopback and local returns would pass
    over, and a nameserver's port 53 is captured even where an exclude covers it.

    forwarded: for the prerouting chain, which leaves out loopback nameservers. A packet from
    elsewhere to a loopback address is a martian that the kernel drops when it routes the
    packet, after prerouting; a redirect there would come first and let it in.
    """
    match = nameservers_match(session, version, forwarded)
    if not match:
        return []
    rule = f"{L4} {owner}{match} {action}"
    # A forwarded packet has no socket, so no bypass mark; mark 0 is every unmarked packet.
    if forwarded or not bypass or not session.bypass_mark:
        return [rule]
    bypass_rule = f"{L4} meta mark {session.bypass_mark:#x} meta skuid {session.caller} {match}"
    return [f"{bypass_rule} return", rule]


def nameservers_match(session: Session, version: int, forwarded: bool = False) -> str:
    """`ip daddr { NAMESERVERS } th dport 53` for the session's nameservers of this IP
    version ("" if none); forwarded: without the loopback ones (dns_rules says why)."""
    addresses = [
        str(address)
        for address in session.dns
        if address.version == version and not (forwarded and address in LOOPBACK[version])
    ]
    if not addresses:
        return ""
    return f"{MATCH[version]} {{ {', '.join(addresses)} }} th dport {DNS_PORT}"


def shortcut_rules(session: Session, version: int, owner: str) -> list[str]:
    """The output chain's rules of the session's shortcuts of this IP version (see the
    module's docstring)."""
    return [
        f"{owner}{MATCH[version]} {shortcut.address} tcp dport {shortcut.port} "
        f"ct count {shortcut.limit} redirect to :{shortcut.local_port}"
        for shortcut in session.shortcuts
        if shortcut.version == version
    ]


# A connection's opening packet: SYN without ACK (nor FIN, RST).
SYN = "tcp flags & (fin | syn | rst | ack) == syn"


def guard_rules(session: Session) -> list[str]:
    """The guard chain's rules (see the module's docstring): none for a session without an
    owner match or without shortcuts."""
    others = [f"meta sk{kind} != {value}" for kind, value in guarded_owners(session)]
    return [
        f"{MATCH[shortcut.version]} {LOOPBACK_TEXT[shortcut.version]} tcp dport "
        f"{shortcut.local_port} {SYN} {other} reject with tcp reset"
        for shortcut in session.shortcuts
        for other in others
    ]


def chain_rules(session: Session, owner: str, forwarded: bool = False) -> list[str]:
    """The rules of one nat chain; owner is the socket owner match, "" for none; forwarded:
    the prerouting chain, without shortcuts."""
    redirect = f"redirect to :{session.port}"
    rules = [
        *(
            rule
            for version in session.versions
            for rule in dns_rules(session, version, owner, redirect, forwarded)
        ),
        LOCAL_RETURN,
    ]
    for version in session.versions:
        rules += [
            *skip_rules(version, "tcp dport"),
            *([] if forwarded else shortcut_rules(session, version, owner)),
            f"{owner}{include_match(version, 'tcp dport')} {redirect}",
        ]
    return rules


def owner_match(session: Session) -> str:
    """`meta skuid U meta skgid G ` as the session asks; such a rule never matches a packet
    without a socket, which is why the prerouting chain (forwarded packets) has none."""
    match = ""
    if session.uid != ANY_OWNER:
        match += f"meta skuid {session.rule_uid} "
    if session.gid != ANY_OWNER:
        match += f"meta skgid {session.rule_gid} "
    return match


# A chain of a session's table: (name, its type, hook and priority, its rules).
Chain = tuple[str, str, list[str]]


def chains(session: Session) -> list[Chain]:
    """The chains of the session's table."""
    # -100 is NF_IP_PRI_NAT_DST, where iptables' nat OUTPUT chain sits as well.
    found = [
        ("output", "nat hook output priority -100", chain_rules(session, owner_match(session)))
    ]
    if session.forward:
        found.append(
            (
                "prerouting",
                "nat hook prerouting priority dstnat",
                chain_rules(session, "", forwarded=True),
            )
        )
    guard = guard_rules(session)
    if guard:  # only then: a session's table has no chain it does not need
        found.append(("guard", "filter hook output priority filter", guard))
    return found


def table_text(session: Session, table_chains: list[Chain], sets: Iterable[str] = ()) -> str:
    """The `nft -f` script that creates the session's table with its sets, these other sets'
    lines, and these chains, all of it in one transaction."""
    table = table_name(session)
    lines = [
        # `create` fails if a table of that name exists: never merge into someone else's.
        f"create table inet {table}",
        f"table inet {table} {{",
    ]
    for version in session.versions:
        # Only the versions captured: excludes of another version exclude from nothing.
        lines += set_text(f"exclude{version}", version, nft_elements(session.excludes, version))
        lines += set_text(f"include{version}", version, nft_elements(session.subnets, version))
    lines += sets
    for name, kind, rules in table_chains:
        lines += [
            f"\tchain {name} {{",
            f"\t\ttype {kind}; policy accept;",
            *(f"\t\t{rule}" for rule in rules),
            "\t}",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def replace_text(session: Session, table_chains: list[Chain], sets: Iterable[str] = ()) -> str:
    """The `nft -f` script that swaps the session's table for one with its sets as they are
    now and these chains, in one transaction: a packet meets the old rules or the new ones,
    never neither, and if any part fails the old table stays as it was.

    The whole table, not only the sets' elements: an IP version that comes or goes brings or
    takes its sets and rules, and one script serves every case. Connections already
    redirected keep their NAT mapping in conntrack, whatever the chains say from now on.
    """
    return f"delete table inet {table_name(session)}\n" + table_text(session, table_chains, sets)


def ruleset(session: Session) -> str:
    """The `nft -f` script of an nft session."""
    return table_text(session, chains(session))


def delete_table(run: Runner, session: Session) -> None:
    """Delete the session's table; log, never raise, if that fails."""
    table = table_name(session)
    try:
        run(NFT, f"delete table inet {table}\n")
    except RequestError as exc:
        log.warning("deleting table inet %s: %s", table, exc)


def stale_tables(listing: str) -> list[str]:
    """From `nft list tables`: the tables an earlier firewalld left behind (the tproxy
    method's tables too: they are named the same way)."""
    lines = listing.splitlines()
    tables = [match.group(1) for match in map(_OUR_TABLE_LINE.fullmatch, lines) if match]
    if f"table inet {PROBE_TABLE}" in lines:
        tables.append(PROBE_TABLE)
    return tables


PROBE = f"""\
table inet {PROBE_TABLE} {{
	set probe4 {{
		type ipv4_addr . inet_service
		flags interval
		elements = {{ 192.0.2.0/24 . 9-10 }}
	}}
	chain output {{
		type nat hook output priority -100; policy accept;
		meta skuid 4294967294 ip daddr . tcp dport @probe4 redirect to :9
	}}
}}
"""


class NftMethod:
    """nft -f -, one call to apply a session and one to remove it."""

    makes_sockets = False  # the caller listens on the redirect port itself

    def __init__(self, run: Runner = run_tool) -> None:
        self._run = run

    def probe(self) -> str | None:
        """Why this method cannot work here, or None if it can.

        Creates and deletes a throwaway table with what sessions use: a nat chain, a
        concatenated interval set, a redirect (for uid (uid_t)-2 to TEST-NET-1: never used).
        """
        try:
            self._run(NFT, PROBE)
        except RequestError as exc:
            return str(exc)
        try:
            self._run(NFT, f"delete table inet {PROBE_TABLE}\n")
        except RequestError as exc:
            log.warning("cannot delete the probe table inet %s: %s", PROBE_TABLE, exc)
        return None

    def apply(self, session: Session) -> int:
        self._run(NFT, ruleset(session))
        return sum(len(rules) for _, _, rules in chains(session))

    def update(
        self,
        session: Session,
        subnets: Targets,
        excludes: Targets,
        shortcuts: tuple[Shortcut, ...] | None = None,
    ) -> int:
        new = with_targets(session, subnets, excludes, shortcuts)
        self._run(NFT, replace_text(new, chains(new)))
        return sum(len(rules) for _, _, rules in chains(new))

    def remove(self, session: Session) -> None:
        delete_table(self._run, session)

    def remove_stale(self) -> int:
        tables = stale_tables(self._run(LIST_TABLES, ""))
        if not tables:
            return 0
        try:
            self._run(NFT, "".join(f"delete table inet {table}\n" for table in tables))
        except RequestError:
            # One transaction fails as a whole (one table gone meanwhile?): one at a time.
            for table in tables:
                try:
                    self._run(NFT, f"delete table inet {table}\n")
                except RequestError as exc:
                    log.warning("deleting stale table inet %s: %s", table, exc)
        log.info("removed %d stale nft tables left by an earlier run: %s", len(tables), tables)
        return len(tables)

"""The tproxy method: TCP and UDP diverted by nft's tproxy to transparent sockets that
firewalld makes and hands to the client. One nftables table per session, with the nft
method's sets, plus a fwmark routing rule and a local route per session and IP version.

Why each odd part is there, for a packet a local program sends to a captured destination:

- tproxy works only in the prerouting hook (the kernel refuses the expression anywhere
  else): it assigns an arriving packet to a local socket, keeping its destination as it
  is. A locally generated packet never passes prerouting, so it has to arrive first.
- The output chain is of type route, where a changed mark makes the kernel route the
  packet again. It marks the caller's captured packets; the mark's `ip rule` sends that
  second lookup to the session's routing table, whose one route is `local default dev lo`.
  So the packet goes out on loopback and comes back in on it, through prerouting.
- There, the prerouting chain hands each packet carrying the session's mark to the
  session's socket (tproxy to 127.0.0.1 or ::1 and the session's port). Only root can put
  a mark on a packet (SO_MARK needs CAP_NET_ADMIN), so the mark says the packet is the
  session's own: traffic from elsewhere is not captured (forward is refused).
- The packet keeps the local route it got at output, so the kernel delivers it here
  although its destination is not one of this host's addresses.
- The sockets must be transparent to be given such packets at all (see transparent.py).
- A session's nameservers: TCP and UDP to their port 53 are marked and diverted the same
  way, by rules before any return; its bypass sockets' packets there are not (bypass.py).
  A nameserver at one of this host's own addresses (loopback included) is refused, although
  capturing it works (tried here with 127.0.0.53 and an interface's address): the UDP
  answer must leave from that address and port 53, so the client would need a reply socket
  there, beside the local resolver, where it could take other users' queries
  (transparent.reply_problem refuses it).

A UDP answer leaves from a reply socket per flow (transparent.reply_socket), which carries
the session's reply mark: the capture mark plus REPLY_OFFSET, named by no ip rule. The
table's replies chain, before any session's output chain, drops every packet with that mark
that does not go to the program of one of the session's flows from that flow's original
destination (the sets flows4 and flows6, one element per flow, added as firewalld makes the
socket and deleted when the flow ends); so the client, which cannot change the mark, cannot
speak for any address to anyone else.

The ids: session slot N has fwmark and routing table MARK_BASE + N, a range this firewalld
treats as its own (docs/firewalld.md), and removes at start if an earlier run left any.

An update swaps the table for a new one in one transaction (as the nft method does); the
sockets, rules and routes stay as they were made at open, for the IP versions captured then.
A version the session had no sockets for cannot be added: the client holds the sockets, and
new ones would need a new handover it is not waiting for.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Callable, Collection, Iterator
from typing import Any

from shuttle_firewalld import transparent
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.prepared import Targets
from shuttle_firewalld.session import Session, Shortcut
from shuttle_firewalld.targets import LOOPBACK, Address
from shuttle_firewalld.transparent import LISTEN_ADDRESS, Flow, is_local, listeners, show

from .base import with_targets
from .nft import (
    ADDRESS_TYPE,
    L4,
    LOCAL_RETURN,
    MATCH,
    NFT,
    PROBE_TABLE,
    Chain,
    delete_table,
    dns_rules,
    include_match,
    owner_match,
    replace_text,
    skip_rules,
    table_name,
    table_text,
)
from .tools import Runner, run_tool

log = logging.getLogger(__name__)

# "SH" in the high half: a session's fwmark and routing table are MARK_BASE + its slot.
MARK_BASE = 0x5348_0000
SLOTS = 256
OWN_IDS = range(MARK_BASE + 1, MARK_BASE + SLOTS + 1)
DEFAULT_ROUTE = {4: "0.0.0.0/0", 6: "::/0"}
TPROXY_TO = {4: f"ip to {LISTEN_ADDRESS[4]}", 6: f"ip6 to [{LISTEN_ADDRESS[6]}]"}
# th dport: the destination port of TCP and UDP alike (the same header bytes). On another
# protocol it reads other bytes, which can only make an exclude return early: the capture
# rules match TCP and UDP only.
DPORT = "th dport"

# A session's reply sockets carry a mark of their own (SO_MARK): its capture mark plus this,
# which no ip rule names, so their packets are routed as any other (to the program they
# answer), and the table's replies chain knows them by it.
REPLY_OFFSET = 0x8000
# The flows fenced per session (their reply sockets may be out): the client's own cap on
# UDP flows. Beyond it the oldest flow's element goes, and its reply socket sends nothing.
MAX_FLOWS = 4096
SOURCE = {4: "ip saddr", 6: "ip6 saddr"}

MakeListeners = Callable[[Collection[int]], tuple[int, dict[str, socket.socket]]]
MakeReplySocket = Callable[[Flow, int, str], socket.socket]


def mark_of(slot: int) -> int:
    return MARK_BASE + slot


def flow_element(flow: Flow) -> str:
    """The flow as an element of its version's flows set: the replies' destination and
    destination port (the program's), then their source and source port."""
    return f"{flow.program} . {flow.program_port} . {flow.destination} . {flow.port}"


def flow_sets(session: Session) -> list[str]:
    """The sets flows4 and flows6 of the session's table, with the flows it fences now.

    Both, whatever the session captures: a flow stays (its reply socket is out) while an
    update takes its IP version away and brings it back, and its element can go any time.
    """
    lines = []
    for version in (4, 6):
        kind = ADDRESS_TYPE[version]
        elements = [flow_element(flow) for flow in session.flows if flow.program.version == version]
        lines += [
            f"\tset flows{version} {{",
            f"\t\ttype {kind} . inet_service . {kind} . inet_service",
        ]
        if elements:
            lines += ["\t\telements = {", ",\n".join(f"\t\t\t{item}" for item in elements), "\t\t}"]
        lines.append("\t}")
    return lines


def flow_script(session: Session, action: str, flows: Collection[Flow]) -> str:
    """The `nft -f` lines that add (action "add") or delete ("delete") these flows' elements."""
    table = table_name(session)
    return "".join(
        f"{action} element inet {table} flows{flow.program.version} {{ {flow_element(flow)} }}\n"
        for flow in flows
    )


def tproxy_to(session: Session, version: int) -> str:
    """Where the session's packets of this IP version are diverted: its socket's address."""
    return f"{TPROXY_TO[version]}:{session.port}"


def chains(session: Session, mark: int) -> list[Chain]:
    """The output chain that marks, and the prerouting chain that diverts."""
    owner = owner_match(session)
    output = [
        *(
            rule
            for version in session.versions
            for rule in dns_rules(session, version, owner, f"meta mark set {mark:#x}")
        ),
        LOCAL_RETURN,
    ]
    # Only packets the output chain marked: traffic from elsewhere is not captured, and
    # every packet that arrives here skips the rest at once. Then the same checks again.
    # tproxy is no verdict: a packet a DNS rule diverted keeps its socket past the returns.
    prerouting = [
        f"meta mark != {mark:#x} return",
        *(
            rule
            for version in session.versions
            # Packets without the capture mark (a bypass socket's too) returned already.
            for rule in dns_rules(
                session, version, "", f"tproxy {tproxy_to(session, version)}", bypass=False
            )
        ),
        LOCAL_RETURN,
    ]
    for version in session.versions:
        skips = skip_rules(version, DPORT)
        include = include_match(version, DPORT)
        output += [*skips, f"{L4} {owner}{include} meta mark set {mark:#x}"]
        prerouting += [*skips, f"{L4} {include} tproxy {tproxy_to(session, version)}"]
    # The reply sockets' packets: each only from its flow's destination to its program.
    replies = [
        f"meta mark != {mark + REPLY_OFFSET:#x} return",
        *(
            f"{MATCH[version]} . udp dport . {SOURCE[version]} . udp sport @flows{version} accept"
            for version in (4, 6)
        ),
        "drop",
    ]
    return [
        # Before every session's output chain (mangle, -150), which might mark a packet anew.
        ("replies", "filter hook output priority mangle - 10", replies),
        # mangle (-150): before the nat and filter chains, as iptables' mangle table.
        ("output", "route hook output priority mangle", output),
        ("prerouting", "filter hook prerouting priority mangle", prerouting),
    ]


def ruleset(session: Session, mark: int) -> str:
    """The `nft -f` script that creates the session's table, in one transaction."""
    return table_text(session, chains(session, mark), flow_sets(session))


def route_commands(versions: Collection[int], mark: int, action: str) -> list[list[str]]:
    """The ip commands that add (action "add") or delete ("del") a session's local routes
    and fwmark rules for these IP versions, in the order to run them: a rule never points
    at a missing route."""
    commands = []
    for version in versions:
        route = ["ip", f"-{version}", "route", action, "local", DEFAULT_ROUTE[version]]
        route += ["dev", "lo", "table", str(mark)]
        rule = ["ip", f"-{version}", "rule", action, "fwmark", f"{mark:#x}", "lookup", str(mark)]
        commands += [route, rule] if action == "add" else [rule, route]
    return commands


def _own_id(text: Any, pattern: str, base: int) -> int | None:
    """The id in text if it is one of ours, written as ip writes it; else None."""
    if type(text) is not str or not re.fullmatch(pattern, text):
        return None
    number = int(text, base)
    return number if number in OWN_IDS else None


def stale_rules(listing: str) -> list[list[str]]:
    """From `ip -j rule show`: how to delete each rule of ours (`pref P fwmark M lookup T`).

    Ours: our fwmark, unmasked, looking up our table. ValueError if listing is no JSON.
    """
    found = []
    for rule in _json_list(listing):
        mark = _own_id(rule.get("fwmark"), r"0x[0-9a-f]{1,8}", 16)
        table = _own_id(rule.get("table"), r"[0-9]{1,10}", 10)
        priority = rule.get("priority")
        if mark is None or table is None or "fwmask" in rule or type(priority) is not int:
            continue
        found.append(["pref", str(priority), "fwmark", f"{mark:#x}", "lookup", str(table)])
    return found


def stale_tables(listing: str) -> list[int]:
    """From `ip -j route show table all`: our routing tables that have routes."""
    tables = {_own_id(route.get("table"), r"[0-9]{1,10}", 10) for route in _json_list(listing)}
    return sorted(table for table in tables if table is not None)


def _json_list(listing: str) -> Iterator[dict[str, Any]]:
    value = json.loads(listing) if listing.strip() else []
    if type(value) is not list:
        raise ValueError("not a JSON list")
    return (item for item in value if type(item) is dict)


PROBE = f"""\
table inet {PROBE_TABLE} {{
	set probe4 {{
		type ipv4_addr . inet_service
		flags interval
		elements = {{ 192.0.2.0/24 . 9-10 }}
	}}
	chain output {{
		type route hook output priority mangle; policy accept;
		{L4} meta skuid 4294967294 ip daddr . {DPORT} @probe4 meta mark set {OWN_IDS[-1]:#x}
	}}
	chain prerouting {{
		type filter hook prerouting priority mangle; policy accept;
		meta mark {OWN_IDS[-1]:#x} {L4} ip daddr . {DPORT} @probe4 tproxy ip to 127.0.0.1:9
		meta mark {OWN_IDS[-1]:#x} {L4} tproxy ip6 to [::1]:9
	}}
}}
"""


class TproxyMethod:
    """nft -f - for the table, ip for the rules and routes; the sockets from transparent.py."""

    makes_sockets = True

    def __init__(
        self,
        run: Runner = run_tool,
        make_listeners: MakeListeners = listeners,
        local: Callable[[Address], bool] = is_local,
        make_reply_socket: MakeReplySocket = transparent.reply_socket,
    ) -> None:
        self._run = run
        self._make_listeners = make_listeners
        self._make_reply_socket = make_reply_socket
        self._local = local
        # Session id -> (slot, the IP versions it has sockets, rules and routes for), while
        # its rules are in.
        self._slots: dict[str, tuple[int, tuple[int, ...]]] = {}

    def probe(self) -> str | None:
        """Why this method cannot work here, or None if it can: a throwaway table with a
        route chain that marks and a tproxy rule per IP version (for uid (uid_t)-2 to
        TEST-NET-1: never used), and the ip tool."""
        try:
            self._run(NFT, PROBE)
        except RequestError as exc:
            return str(exc)
        try:
            self._run(NFT, f"delete table inet {PROBE_TABLE}\n")
        except RequestError as exc:
            log.warning("cannot delete the probe table inet %s: %s", PROBE_TABLE, exc)
        try:
            self._run(["ip", "-4", "rule", "show"], "")
        except RequestError as exc:
            return str(exc)
        return None

    def apply(self, session: Session) -> int:
        if session.forward:
            # The prerouting chain takes only packets the output chain marked.
            raise RequestError(
                "the tproxy method does not capture forwarded traffic; ask for nft or nat"
            )
        for address in session.dns:
            # Its answers would need a reply socket at this host's own address (see above).
            if address in LOOPBACK[address.version] or self._local(address):
                raise RequestError(
                    f"the tproxy method cannot capture DNS to {address}, an address of this "
                    "host: its answers would need a socket there on port 53, where other "
                    "users' queries could reach it; use --ns-hosts with a nameserver that is "
                    "not on this host (not loopback), or the nft or nat method"
                )
        used = {slot for slot, _ in self._slots.values()}
        slot = next((slot for slot in range(1, SLOTS + 1) if slot not in used), None)
        if slot is None:
            raise RequestError(f"all {SLOTS} tproxy sessions of this host are in use")
        mark = mark_of(slot)
        # The sockets first: the rules name their port.
        session.port, session.sockets = self._make_listeners(session.versions)
        done: list[list[str]] = []
        try:
            for argv in route_commands(session.versions, mark, "add"):
                self._run(argv, "")
                done.append(argv)
            self._run(NFT, ruleset(session, mark))
        except BaseException:
            for argv in reversed(done):  # all of the session or nothing
                self._delete([*argv[:3], "del", *argv[4:]])  # the same, as "del"
            self._close_sockets(session)
            raise
        self._slots[session.id] = (slot, session.versions)
        return sum(len(rules) for _, _, rules in chains(session, mark)) + len(done)

    def update(
        self,
        session: Session,
        subnets: Targets,
        excludes: Targets,
        shortcuts: tuple[Shortcut, ...] | None = None,
    ) -> int:
        if shortcuts:  # Sessions refuses them before: a diverted packet reaches our sockets only
            raise RequestError("the tproxy method has no shortcuts")
        slot, made = self._slots[session.id]
        new = with_targets(session, subnets, excludes)
        for version in new.versions:
            if version not in made:
                raise RequestError(
                    f"this tproxy session has no IPv{version} sockets (it was opened without "
                    f"IPv{version} subnets): capturing IPv{version} needs a new session"
                )
        mark = mark_of(slot)
        self._run(NFT, replace_text(new, chains(new, mark), flow_sets(new)))
        # The routes and rules of a version no longer captured stay: only packets the table
        # marks take them, and it marks none of that version now.
        routes = len(route_commands(made, mark, "add"))
        return sum(len(rules) for _, _, rules in chains(new, mark)) + routes

    def reply_socket(self, session: Session, flow: Flow) -> socket.socket:
        """A fenced reply socket for one flow of the session (transparent.reply_socket), its
        element in the session's flows set; RequestError if the routing says no reply may
        come from the flow's destination, or the program's address is not this host's.

        The caller checked the rest: the destination is captured, and the program's socket
        is of a uid the session captures.
        """
        slot, _ = self._slots[session.id]
        where = show(flow.destination, flow.port)
        try:
            route = self._run(["ip", "-j", "route", "get", str(flow.destination)], "")
            kind = transparent.route_type(route)
            version = f"-{flow.destination.version}"
            found = transparent.host_addresses(self._run(["ip", "-j", version, "addr", "show"], ""))
        except RequestError as exc:
            raise RequestError(f"cannot check the route to {where}: {exc}") from None
        except ValueError as exc:
            raise RequestError(f"cannot read what ip says of {where}: {exc}") from None
        problem = transparent.destination_problem(flow, kind, found)
        if problem is not None:
            raise RequestError(problem)
        sock = self._make_reply_socket(
            flow, mark_of(slot) + REPLY_OFFSET, transparent.program_device(flow, found)
        )
        oldest = (
            []
            if flow in session.flows or len(session.flows) < MAX_FLOWS
            else [next(iter(session.flows))]
        )
        try:
            # One transaction: the oldest flow's element goes as the new one comes.
            self._run(
                NFT, flow_script(session, "delete", oldest) + flow_script(session, "add", [flow])
            )
        except BaseException:
            sock.close()
            raise
        for old in oldest:
            del session.flows[old]
        session.flows.pop(flow, None)  # now the newest
        session.flows[flow] = None
        return sock

    def forget_flows(self, session: Session, flows: Collection[Flow]) -> None:
        """Remove these flows' elements: their reply sockets send nothing from now on.
        Never raises; logs a failure, and the elements go with the table at the latest."""
        gone = [flow for flow in flows if flow in session.flows]
        if not gone:
            return
        for flow in gone:
            del session.flows[flow]
        try:
            self._run(NFT, flow_script(session, "delete", gone))
        except RequestError as exc:
            log.warning("removing %d flows of session %s: %s", len(gone), session.short_id, exc)

    def remove(self, session: Session) -> None:
        self._close_sockets(session)  # those not handed over
        found = self._slots.pop(session.id, None)
        if found is None:
            return
        slot, made = found
        delete_table(self._run, session)
        for argv in route_commands(made, mark_of(slot), "del"):
            self._delete(argv)

    def remove_stale(self) -> int:
        found: set[str] = set()
        problems = []
        for version in (4, 6):
            ip = ["ip", f"-{version}"]
            try:
                rules = stale_rules(self._run([*ip, "-j", "rule", "show"], ""))
                tables = stale_tables(self._run([*ip, "-j", "route", "show", "table", "all"], ""))
            except (RequestError, ValueError) as exc:  # say so, and still look at the other
                problems.append(f"IPv{version}: {exc}")
                continue
            for rule in rules:
                self._delete([*ip, "rule", "del", *rule])
                found.add(rule[-1])
            for table in tables:
                self._delete([*ip, "route", "flush", "table", str(table)])
                found.add(str(table))
            if rules or tables:
                log.info(
                    "removed %d stale IPv%d fwmark rules and the routes of %d stale tables "
                    "left by an earlier run",
                    len(rules),
                    version,
                    len(tables),
                )
        if problems:
            raise RequestError("; ".join(problems))
        return len(found)

    def _delete(self, argv: list[str]) -> None:
        try:
            self._run(argv, "")
        except RequestError as exc:
            log.warning("%s: %s", " ".join(argv), exc)

    @staticmethod
    def _close_sockets(session: Session) -> None:
        for sock in session.sockets.values():
            sock.close()
        session.sockets = {}

"""The nat method: TCP captured with iptables / ip6tables REDIRECT, one chain per IP version
per session, a rule per subnet.

REDIRECT in the nat table's OUTPUT chain rewrites the destination of locally generated
packets to the loopback address (nf_nat_redirect: 127.0.0.1, or ::1 for IPv6), so the client
must listen there; its listener learns the original destination from SO_ORIGINAL_DST. In
PREROUTING (forward) it rewrites to the address of the interface the packet came in on, so a
forwarding session needs a wildcard listener.

Each version is one iptables-restore --noflush call: one commit, all of it or nothing. A
session with both versions is two commits; if the second fails, the first is undone. An
update refills each version's chain in one commit (declaring a chain empties it), adds or
drops a version's chain and jumps where the IP versions change, and undoes what it did if a
later version fails.

A session's nameservers: TCP and UDP to their port 53 are redirected to the same port by
rules at the top of the chain (the caller's UDP socket takes the datagrams; conntrack turns
the source of its answers back into the nameserver's), and UDP to port 53 jumps into the
chain as well.

A session's shortcuts (SetShortcutsRequest) are rules of its chain, after the returns and
before the capture rules: `-m connlimit --connlimit-upto N --connlimit-mask 32
--connlimit-daddr -j REDIRECT --to-ports LOCAL` sends a new connection to one destination
into the caller's loopback port LOCAL while at most N connections through that rule to
that address are open, this one included (xt_connlimit counts as nft's `ct count` does:
see nft.py); the next one falls through to the capture rule. They need no owner match:
the OUTPUT jump has it. A session with forward has none (sessions.py refuses them): its
PREROUTING jump enters the same chain, where forwarded connections would take them, and
iptables refuses an owner match in a chain that PREROUTING reaches.
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass

from shuttle_protocol.firewall_messages import ANY_OWNER

from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.prepared import Targets, nat_matches
from shuttle_firewalld.session import Session, Shortcut
from shuttle_firewalld.targets import DNS_PORT, LOOPBACK

from .base import with_targets
from .tools import Runner, run_tool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tools:
    """The commands of one IP version."""

    restore: tuple[str, ...]
    save: tuple[str, ...]
    single: tuple[str, ...]


TOOLS = {
    # -w: wait for the xtables lock; iptables-save takes no lock, so no -w there.
    4: Tools(
        restore=("iptables-restore", "-w", "--noflush"),
        save=("iptables-save", "-t", "nat"),
        single=("iptables", "-w", "-t", "nat"),
    ),
    6: Tools(
        restore=("ip6tables-restore", "-w", "--noflush"),
        save=("ip6tables-save", "-t", "nat"),
        single=("ip6tables", "-w", "-t", "nat"),
    ),
}
CHAIN_PREFIX = "SHUTTLE-"
# Only chains we could have made (the prefix and a short session id, 12 hex digits), as
# iptables-save declares them: ":SHUTTLE-0123456789ab - [0:0]".
_OUR_CHAIN_LINE = re.compile(r":(SHUTTLE-[0-9a-f]{12})\s")


def chain_name(session: Session) -> str:
    return CHAIN_PREFIX + session.short_id


def jump_rules(session: Session, version: int) -> list[str]:
    """The rules that send an IP version's TCP into the session's chain (and UDP to port 53,
    if the session has nameservers of that version): the caller's scope in OUTPUT, and with
    forward everything in PREROUTING (forwarded packets have no socket, no owner)."""
    owner = ""
    if session.uid != ANY_OWNER:
        owner += f" --uid-owner {session.rule_uid}"
    if session.gid != ANY_OWNER:
        owner += f" --gid-owner {session.rule_gid}"
    owner = f" -m owner{owner}" if owner else ""
    protocols = ["-p tcp"]
    if any(address.version == version for address in session.dns):
        protocols.append(f"-p udp -m udp --dport {DNS_PORT}")
    chain = chain_name(session)
    jumps = [f"OUTPUT {protocol}{owner} -j {chain}" for protocol in protocols]
    if session.forward:
        # Not loopback: the chain never captures it for a subnet, and a packet from
        # elsewhere to a loopback address is a martian that the kernel drops when it routes
        # the packet, after prerouting; a nameserver's redirect there would let it in.
        jumps += [
            f"PREROUTING ! -d {LOOPBACK[version]} {protocol} -j {chain}" for protocol in protocols
        ]
    return jumps


def dns_rules(session: Session, version: int) -> list[str]:
    """The rules that redirect TCP and UDP to port 53 of the session's nameservers of this
    IP version. They come first in the chain, before any return: the common nameserver is a
    local stub resolver (127.0.0.53, 127.0.0.1), which the loopback and local returns would
    pass over, and a nameserver's port 53 is captured even where an exclude covers it.
    Before each, its bypass sockets' packets return."""
    rules = []
    for address in session.dns:
        if address.version != version:
            continue
        for protocol in ("tcp", "udp"):
            match = f"-d {address}/{address.max_prefixlen} -p {protocol} -m {protocol} "
            match += f"--dport {DNS_PORT}"
            # The session's bypass sockets (bypass.py; mark 0: none), its caller's. A
            # forwarded packet has no socket and never this mark; with forward, the
            # PREROUTING jump brings it here too, where iptables refuses an owner match.
            if session.bypass_mark:
                owner = "" if session.forward else f" -m owner --uid-owner {session.caller}"
                bypass = f"-m mark --mark {session.bypass_mark:#x}{owner}"
                rules.append(f"{match} {bypass} -j RETURN")
            rules.append(f"{match} -j REDIRECT --to-ports {session.port}")
    return rules


def shortcut_rules(session: Session, version: int) -> list[str]:
    """The rules of the session's shortcuts of this IP version (see the module's docstring)."""
    return [
        f"-d {shortcut.address}/{shortcut.address.max_prefixlen} -p tcp -m tcp "
        f"--dport {shortcut.port} -m connlimit --connlimit-upto {shortcut.limit} "
        f"--connlimit-mask {shortcut.address.max_prefixlen} --connlimit-daddr "
        f"-j REDIRECT --to-ports {shortcut.local_port}"
        for shortcut in session.shortcuts
        if shortcut.version == version
    ]


def chain_lines(session: Session, version: int) -> list[str]:
    """The session's chain of one IP version, as iptables-restore lines: its declaration
    and its rules."""
    chain = chain_name(session)
    # Excludes of the other version are dropped: they exclude from nothing here.
    return [
        f":{chain} - [0:0]",
        *(f"-A {chain} {rule}" for rule in dns_rules(session, version)),
        # The host's own addresses are never captured: a connection to this host is not for
        # the tunnel (and for a router, its own services stay reachable).
        f"-A {chain} -m addrtype --dst-type LOCAL -j RETURN",
        # Loopback, always: the redirect itself goes there.
        f"-A {chain} -d {LOOPBACK[version]} -j RETURN",
        # Excludes first, so they win over any include they overlap.
        *(f"-A {chain} {match} -j RETURN" for match in nat_matches(session.excludes, version)),
        *(f"-A {chain} {rule}" for rule in shortcut_rules(session, version)),
        *(
            f"-A {chain} {match} -j REDIRECT --to-ports {session.port}"
            for match in nat_matches(session.subnets, version, protocol=True)
        ),
    ]


def apply_text(session: Session, version: int) -> str:
    """The iptables-restore input that installs one IP version of the session in one commit."""
    lines = [
        "*nat",
        *chain_lines(session, version),
        *(f"-A {rule}" for rule in jump_rules(session, version)),
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def refill_text(session: Session, version: int) -> str:
    """The iptables-restore input that replaces the rules of the session's chain of one IP
    version with the session's, in one commit.

    With --noflush, iptables-restore still empties every chain the input declares (tried
    here with iptables 1.8.9, nf_tables backend): declaring the session's chain is
    what removes its old rules, in the same commit that adds the new ones. The jumps into
    the chain stay: they follow the session's scope and nameservers, which do not change.
    """
    return "\n".join(["*nat", *chain_lines(session, version), "COMMIT"]) + "\n"


def removal_text(jumps: list[str], chains: list[str]) -> str:
    """The iptables-restore input that deletes the jump rules, then empties and drops chains."""
    lines = [
        "*nat",
        *(f"-D {rule}" for rule in jumps),
        *(f"-F {chain}" for chain in chains),
        *(f"-X {chain}" for chain in chains),
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def stale_rules(saved: str) -> tuple[list[str], list[str]]:
    """From `iptables-save -t nat` output: (jump rules into our chains, our chains)."""
    chains = [
        match.group(1)
        for match in map(_OUR_CHAIN_LINE.match, saved.splitlines())
        if match is not None
    ]
    jumps = []
    for line in saved.splitlines():
        if not line.startswith("-A "):
            continue
        words = line.split()
        target = words[words.index("-j") + 1] if "-j" in words[:-1] else ""
        # Rules inside our chains go with the flush; only jumps from elsewhere need a -D.
        if target in chains and words[1] not in chains:
            jumps.append(line[3:])
    return jumps, chains


class NatMethod:
    """iptables-restore --noflush, one call per IP version to apply a session or remove it."""

    makes_sockets = False  # the caller listens on the redirect port itself

    def __init__(self, run: Runner = run_tool) -> None:
        self._run = run

    def apply(self, session: Session) -> int:
        rules = 0
        done: list[int] = []
        for version in session.versions:
            text = apply_text(session, version)
            try:
                self._run(TOOLS[version].restore, text)
            except RequestError:
                for applied in done:  # all of the session or nothing
                    self._remove(applied, jump_rules(session, applied), [chain_name(session)])
                raise
            done.append(version)
            rules += text.count("\n-A ")
        return rules

    def update(
        self,
        session: Session,
        subnets: Targets,
        excludes: Targets,
        shortcuts: tuple[Shortcut, ...] | None = None,
    ) -> int:
        new = with_targets(session, subnets, excludes, shortcuts)
        chain = [chain_name(session)]
        undo: list[tuple[int, str]] = []  # (version, the input that puts it back), in order
        try:
            for version in sorted({*session.versions, *new.versions}):
                if version in session.versions and version in new.versions:
                    text, back = refill_text(new, version), refill_text(session, version)
                elif version in new.versions:  # a version the session did not capture
                    text = apply_text(new, version)
                    back = removal_text(jump_rules(new, version), chain)
                else:  # one it no longer captures: its chain and jumps go
                    text = removal_text(jump_rules(session, version), chain)
                    back = apply_text(session, version)
                self._run(TOOLS[version].restore, text)
                undo.append((version, back))
        except RequestError:
            # Two versions are two tools, two commits: the one done goes back as it was.
            for version, back in reversed(undo):
                try:
                    self._run(TOOLS[version].restore, back)
                except RequestError as exc:
                    log.warning(
                        "undoing the IPv%d update of session %s: %s", version, session.short_id, exc
                    )
            raise
        return sum(apply_text(new, version).count("\n-A ") for version in new.versions)

    def remove(self, session: Session) -> None:
        for version in session.versions:
            self._remove(version, jump_rules(session, version), [chain_name(session)])

    def remove_stale(self) -> int:
        found = 0
        problems = []
        for version, tools in TOOLS.items():
            try:
                jumps, chains = stale_rules(self._run(tools.save, ""))
            except RequestError as exc:  # say so, and still look at the other version
                problems.append(str(exc))
                continue
            if chains:
                self._remove(version, jumps, chains)
                log.info(
                    "removed %d stale IPv%d chains left by an earlier run: %s",
                    len(chains),
                    version,
                    chains,
                )
            found += len(chains)
        if problems:
            raise RequestError("; ".join(problems))
        return found

    def _remove(self, version: int, jumps: list[str], chains: list[str]) -> None:
        tools = TOOLS[version]
        try:
            self._run(tools.restore, removal_text(jumps, chains))
            return
        except RequestError as exc:
            # Usually a part is gone already; then one commit fails as a whole, so go step
            # by step, each on its own, to remove whatever is still there.
            log.debug("one-step removal failed (%s); removing step by step", exc)
        steps = [
            *(("-D", rule) for rule in jumps),
            *(("-F", chain) for chain in chains),
            *(("-X", chain) for chain in chains),
        ]
        for action, target in steps:
            try:
                self._run([*tools.single, action, *shlex.split(target)], "")
            except (RequestError, ValueError) as exc:  # ValueError: quoting shlex cannot split
                log.warning("%s %s %s: %s", tools.single[0], action, target, exc)

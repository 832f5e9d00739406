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

ssh's forward accepts a connection from any local user, and forwards it as the session's
owner. So a session with an owner match and shortcuts of an IP version has a guard there:
a chain of the same name in the filter table, entered from the top of its OUTPUT (`-I`: a
host's own `-o lo -j ACCEPT` there would pass everything before an appended jump) for TCP
to loopback. Filter OUTPUT comes after nat OUTPUT, so the owner's redirected SYN is seen
with its new destination, LOCAL on loopback. For each shortcut, an opening SYN to LOCAL
from a socket of another uid (`! --uid-owner U`), or of another gid where the session names
one (`! --gid-owner G`, a rule of its own: either mismatch is enough), gets a TCP reset.
Only the SYN: xt_owner's inverted match also takes packets without a user's socket (the
kernel's own RST, a TIME_WAIT's ACK), which must pass. The owner's connections, redirected
or direct, pass. A session that captures every user's traffic has no guard: it sends them
all there anyway. The guard is its own commit, before the nat one when it comes and after
it when it goes, so it is in force whenever the shortcuts are.
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

from .base import guarded_owners, with_targets
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
        save=("iptables-save",),
        single=("iptables", "-w"),
    ),
    6: Tools(
        restore=("ip6tables-restore", "-w", "--noflush"),
        save=("ip6tables-save",),
        single=("ip6tables", "-w"),
    ),
}
# Where a session's chains are: its capture in nat, its shortcuts' guard in filter.
TABLES = ("nat", "filter")
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


def guard_rules(session: Session, version: int) -> list[str]:
    """The rules of the session's guard of this IP version (see the module's docstring):
    none for a session without an owner match or without shortcuts of that version."""
    others = [f"! --{kind}-owner {value}" for kind, value in guarded_owners(session)]
    return [
        f"-p tcp -m tcp --dport {shortcut.local_port} --tcp-flags FIN,SYN,RST,ACK SYN "
        f"-m owner {other} -j REJECT --reject-with tcp-reset"
        for shortcut in session.shortcuts
        if shortcut.version == version
        for other in others
    ]


def guard_jump(session: Session, version: int) -> str:
    """The filter OUTPUT rule that sends TCP to loopback into the session's guard."""
    return f"OUTPUT -d {LOOPBACK[version]} -p tcp -j {chain_name(session)}"


def guard_lines(session: Session, version: int) -> list[str]:
    """The guard chain of one IP version, as iptables-restore lines: its declaration (which
    empties it, as refill_text says) and its rules."""
    chain = chain_name(session)
    return [f":{chain} - [0:0]", *(f"-A {chain} {rule}" for rule in guard_rules(session, version))]


def guard_text(session: Session, version: int) -> str:
    """The iptables-restore input that installs the guard of one IP version, chain and
    jump, in one commit."""
    lines = ["*filter", *guard_lines(session, version), f"-I {guard_jump(session, version)}"]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def guard_refill_text(session: Session, version: int) -> str:
    """The iptables-restore input that replaces the rules of the guard of one IP version,
    in one commit; its jump stays (it depends on nothing that changes)."""
    return "\n".join(["*filter", *guard_lines(session, version), "COMMIT"]) + "\n"


def guard_removal_text(session: Session, version: int) -> str:
    return removal_text([guard_jump(session, version)], [chain_name(session)], "filter")


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


def removal_text(jumps: list[str], chains: list[str], table: str = "nat") -> str:
    """The iptables-restore input that deletes the jump rules, then empties and drops chains,
    of one table."""
    lines = [
        f"*{table}",
        *(f"-D {rule}" for rule in jumps),
        *(f"-F {chain}" for chain in chains),
        *(f"-X {chain}" for chain in chains),
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def stale_rules(saved: str) -> tuple[list[str], list[str]]:
    """From `iptables-save -t TABLE` output: (jump rules into our chains, our chains)."""
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


# One commit and the iptables-restore input that undoes it: (IP version, input, undo).
Step = tuple[int, str, str]


def rules_in(text: str) -> int:
    """How many rules an iptables-restore input adds."""
    return sum(line.startswith(("-A ", "-I ")) for line in text.splitlines())


def apply_steps(session: Session) -> list[Step]:
    """The commits that install the session, in order, each with its undo."""
    chain = [chain_name(session)]
    steps = []
    for version in session.versions:
        if guard_rules(session, version):
            steps.append(
                (version, guard_text(session, version), guard_removal_text(session, version))
            )
        steps.append(
            (
                version,
                apply_text(session, version),
                removal_text(jump_rules(session, version), chain),
            )
        )
    return steps


def update_steps(session: Session, new: Session) -> list[Step]:
    """The commits that turn the session's rules into new's, in order, each with its undo."""
    chain = [chain_name(session)]
    steps = []
    for version in sorted({*session.versions, *new.versions}):
        if version in session.versions and version in new.versions:
            step = (version, refill_text(new, version), refill_text(session, version))
        elif version in new.versions:  # a version the session did not capture
            step = (
                version,
                apply_text(new, version),
                removal_text(jump_rules(new, version), chain),
            )
        else:  # one it no longer captures: its chain and jumps go
            step = (
                version,
                removal_text(jump_rules(session, version), chain),
                apply_text(session, version),
            )
        guarded, guarding = bool(guard_rules(session, version)), bool(guard_rules(new, version))
        if guarding and guarded:
            steps.append(
                (version, guard_refill_text(new, version), guard_refill_text(session, version))
            )
        elif guarding:
            steps.append((version, guard_text(new, version), guard_removal_text(new, version)))
        steps.append(step)
        if guarded and not guarding:
            steps.append(
                (version, guard_removal_text(session, version), guard_text(session, version))
            )
    return steps


class NatMethod:
    """iptables-restore --noflush, one call per IP version and table to apply a session or
    remove it."""

    makes_sockets = False  # the caller listens on the redirect port itself

    def __init__(self, run: Runner = run_tool) -> None:
        self._run = run

    def apply(self, session: Session) -> int:
        steps = apply_steps(session)
        self._commit(session, steps)
        return sum(rules_in(text) for _, text, _ in steps)

    def update(
        self,
        session: Session,
        subnets: Targets,
        excludes: Targets,
        shortcuts: tuple[Shortcut, ...] | None = None,
    ) -> int:
        new = with_targets(session, subnets, excludes, shortcuts)
        self._commit(session, update_steps(session, new))
        return sum(rules_in(text) for _, text, _ in apply_steps(new))

    def _commit(self, session: Session, steps: list[Step]) -> None:
        """Run the steps in order; if one fails, undo the ones done, last first, and raise."""
        done: list[Step] = []
        try:
            for step in steps:
                self._run(TOOLS[step[0]].restore, step[1])
                done.append(step)
        except RequestError:
            # Each step is its own commit: the ones done go back as they were.
            for version, _, back in reversed(done):
                try:
                    self._run(TOOLS[version].restore, back)
                except RequestError as exc:
                    log.warning(
                        "undoing an IPv%d step of session %s: %s", version, session.short_id, exc
                    )
            raise

    def remove(self, session: Session) -> None:
        chain = [chain_name(session)]
        for version in session.versions:
            self._remove(version, "nat", jump_rules(session, version), chain)
            if guard_rules(session, version):  # after the shortcuts it guards
                self._remove(version, "filter", [guard_jump(session, version)], chain)

    def remove_stale(self) -> int:
        found = 0
        problems = []
        for version, tools in TOOLS.items():
            for table in TABLES:
                try:
                    jumps, chains = stale_rules(self._run([*tools.save, "-t", table], ""))
                except RequestError as exc:  # say so, and still look at the others
                    problems.append(str(exc))
                    continue
                if chains:
                    self._remove(version, table, jumps, chains)
                    log.info(
                        "removed %d stale IPv%d %s chains left by an earlier run: %s",
                        len(chains),
                        version,
                        table,
                        chains,
                    )
                found += len(chains)
        if problems:
            raise RequestError("; ".join(problems))
        return found

    def _remove(self, version: int, table: str, jumps: list[str], chains: list[str]) -> None:
        tools = TOOLS[version]
        try:
            self._run(tools.restore, removal_text(jumps, chains, table))
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
                self._run([*tools.single, "-t", table, action, *shlex.split(target)], "")
            except (RequestError, ValueError) as exc:  # ValueError: quoting shlex cannot split
                log.warning("%s -t %s %s %s: %s", tools.single[0], table, action, target, exc)

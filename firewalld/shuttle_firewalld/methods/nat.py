"""The nat method: IPv4 TCP captured with iptables REDIRECT, one chain per session.

REDIRECT in the nat table's OUTPUT chain rewrites the destination of locally generated
packets to the loopback address 127.0.0.1 (the kernel's rule for output: "locally generated
packets are mapped to the localhost address"), so the client must listen there; its
listener learns the original destination from SO_ORIGINAL_DST.
"""

from __future__ import annotations

import logging
import re
import shlex
from typing import TYPE_CHECKING

from shuttle_firewalld.errors import RequestError

from .tools import Runner, run_tool

if TYPE_CHECKING:
    from shuttle_firewalld.sessions import Session

log = logging.getLogger(__name__)

RESTORE = ("iptables-restore", "-w", "--noflush")  # -w: wait for the xtables lock
SAVE = ("iptables-save", "-t", "nat")  # iptables-save takes no lock, so no -w
IPTABLES = ("iptables", "-w", "-t", "nat")
CHAIN_PREFIX = "SHUTTLE-"
# Only chains we could have made (the prefix and a short session id, 12 hex digits), as
# iptables-save declares them: ":SHUTTLE-0123456789ab - [0:0]".
_OUR_CHAIN_LINE = re.compile(r":(SHUTTLE-[0-9a-f]{12})\s")
# Never capture loopback: the client's own listener lives there, and so does the redirect.
LOOPBACK = "127.0.0.0/8"


def chain_name(session: Session) -> str:
    return CHAIN_PREFIX + session.short_id


def jump_rule(session: Session) -> str:
    """The OUTPUT rule that sends the caller's own TCP (only its uid's) into the chain."""
    return f"OUTPUT -p tcp -m owner --uid-owner {session.uid} -j {chain_name(session)}"


def apply_text(session: Session) -> str:
    """The iptables-restore input that installs the session in one commit."""
    if any(subnet.version != 4 for subnet in session.subnets):
        raise RequestError("the nat method captures IPv4 only; drop the IPv6 subnets")
    chain = chain_name(session)
    # IPv6 excludes are dropped: they exclude from nothing, since nothing IPv6 is captured.
    excludes = [LOOPBACK, *(str(net) for net in session.excludes if net.version == 4)]
    lines = [
        "*nat",
        f":{chain} - [0:0]",
        *(f"-A {chain} -d {net} -p tcp -j RETURN" for net in excludes),
        *(
            f"-A {chain} -d {net} -p tcp -j REDIRECT --to-ports {session.port}"
            for net in session.subnets
        ),
        f"-A {jump_rule(session)}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


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
    """iptables-restore --noflush, one call to apply a session and one to remove it."""

    def __init__(self, run: Runner = run_tool) -> None:
        self._run = run

    def apply(self, session: Session) -> int:
        text = apply_text(session)
        self._run(RESTORE, text)
        return text.count("\n-A ")

    def remove(self, session: Session) -> None:
        self._remove([jump_rule(session)], [chain_name(session)])

    def remove_stale(self) -> int:
        jumps, chains = stale_rules(self._run(SAVE, ""))
        if chains:
            self._remove(jumps, chains)
            log.info("removed %d stale chains left by an earlier run: %s", len(chains), chains)
        return len(chains)

    def _remove(self, jumps: list[str], chains: list[str]) -> None:
        try:
            self._run(RESTORE, removal_text(jumps, chains))
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
                self._run([*IPTABLES, action, *shlex.split(target)], "")
            except (RequestError, ValueError) as exc:  # ValueError: quoting shlex cannot split
                log.warning("iptables %s %s: %s", action, target, exc)

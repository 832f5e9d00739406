"""One session: what a caller captures, whose it is, and what firewalld holds for it.

A plain record, imported by everything that works on a session (sessions.py, which keeps
them, handover.py and each method), and importing none of them: imports run one way.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from shuttle_protocol.firewall_messages import ANY_OWNER

from .netns import HOME, Netns
from .prepared import Targets, versions_of
from .targets import Address
from .transparent import Flow


@dataclass(frozen=True)
class Shortcut:
    """New TCP connections to (address, port) of a session's owner go to local_port on
    loopback instead of the session's port, while at most limit connections to (address,
    port) of that owner are open, this one included (methods/nft.py says how that counts)."""

    address: Address
    port: int
    local_port: int
    limit: int

    @property
    def version(self) -> int:
        return self.address.version


@dataclass(eq=False)
class Session:
    """One caller's capture: in force from apply() until remove(), as long as its lease."""

    id: str
    caller: int  # the uid that opened the session and owns it (the kernel said so)
    method: str  # the method applied: "nat", "nft" or "tproxy"
    port: int  # where captured traffic goes (tproxy: the port firewalld picked)
    subnets: Targets
    excludes: Targets
    deadline: float
    uid: int = ANY_OWNER  # whose traffic is captured; ANY_OWNER: everybody's
    gid: int = ANY_OWNER  # and of which group; ANY_OWNER: any
    forward: bool = False  # also traffic routed through this host
    dns: tuple[Address, ...] = ()  # nameservers: TCP and UDP to their port 53 captured too
    # The mark of its bypass sockets (bypass.py), whose DNS to those nameservers it lets by.
    bypass_mark: int = 0
    pid: int | None = None  # the process that opened it: the session ends when it does
    netns: Netns = HOME  # where its method calls run: the network namespace of that process
    rules: int = 0
    opened: float = 0.0  # when its rules went in (the clock of Sessions)
    hosts: int = 0  # entries its last SetHosts wrote into the hosts file
    hosts_asked: tuple[int, int] = (0, 0)  # entries and bytes its last SetHosts asked for
    # The listening sockets firewalld made for the session (tproxy), by kind ("tcp4", ...),
    # until they are handed over to the caller; then firewalld's copies are closed.
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    # The flows its reply sockets answer (tproxy), oldest first: each may send only there.
    flows: dict[Flow, None] = field(default_factory=dict)
    # Its destinations whose connections go to a listener of the caller's instead (nat, nft).
    shortcuts: tuple[Shortcut, ...] = ()

    @property
    def short_id(self) -> str:
        """The id's first 12 characters: enough to be unique here, short enough for names."""
        return self.id[:12]

    @property
    def rule_uid(self) -> int:
        """uid as its rules name it: as the kernel shows it in the session's namespace."""
        return self.netns.uid(self.uid)

    @property
    def rule_gid(self) -> int:
        return self.netns.gid(self.gid)

    @property
    def versions(self) -> tuple[int, ...]:
        """The IP versions the session captures: those of its subnets and of its
        nameservers, 4 before 6."""
        found = versions_of(self.subnets) | {address.version for address in self.dns}
        return tuple(sorted(found))

    def scope(self) -> str:
        """Whose traffic, in words, for the log."""
        text = "every uid" if self.uid == ANY_OWNER else f"uid {self.uid}"
        if self.gid != ANY_OWNER:
            text += f" in gid {self.gid}"
        return text + (", and forwarded traffic" if self.forward else "")

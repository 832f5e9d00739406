"""The interface every firewall method implements: apply, update and remove one session's
rules."""

from __future__ import annotations

import dataclasses
from typing import Protocol

from shuttle_protocol.firewall_messages import ANY_OWNER

from shuttle_firewalld.prepared import Targets
from shuttle_firewalld.session import Session, Shortcut


def guarded_owners(session: Session) -> list[tuple[str, int]]:
    """What a session's guard resets a connection for not matching (methods/nft.py says
    why): ("uid", its uid) and ("gid", its gid) where the session names them, a rule each,
    as each tool spells it."""
    owners = []
    if session.uid != ANY_OWNER:
        owners.append(("uid", session.rule_uid))
    if session.gid != ANY_OWNER:
        owners.append(("gid", session.rule_gid))
    return owners


def with_targets(
    session: Session,
    subnets: Targets,
    excludes: Targets,
    shortcuts: tuple[Shortcut, ...] | None = None,
) -> Session:
    """A copy of the session with other subnets and excludes (and shortcuts, unless None),
    for update() to write the new rules from while the session itself keeps the old ones."""
    if shortcuts is None:
        shortcuts = session.shortcuts
    return dataclasses.replace(session, subnets=subnets, excludes=excludes, shortcuts=shortcuts)


class Method(Protocol):
    """One way of capturing traffic (nft, nat, tproxy), one module each."""

    # False: the caller listens on the session's port itself, which firewalld checks before
    # apply(). True: apply() makes the listening sockets (tproxy: they must be transparent,
    # which needs CAP_NET_ADMIN), sets session.port and session.sockets, and remove() closes
    # those not handed over.
    makes_sockets: bool

    def apply(self, session: Session) -> int:
        """Install the session's rules atomically and return how many there are.

        Raises RequestError, with nothing installed, when the session asks for something
        this method cannot do or the firewall tool fails.
        """
        ...

    def update(
        self,
        session: Session,
        subnets: Targets,
        excludes: Targets,
        shortcuts: tuple[Shortcut, ...] | None = None,
    ) -> int:
        """Replace the session's subnets and excludes in its rules (and its shortcuts, unless
        None; the tproxy method has none), atomically, and return how many rules there are
        now; the session itself still holds the old ones (the caller sets the new ones on
        success).

        Raises RequestError, with the old rules still in force, when the new ones cannot be.
        """
        ...

    def remove(self, session: Session) -> None:
        """Remove exactly the session's rules, best effort, logging what fails; never raises."""
        ...

    def remove_stale(self) -> int:
        """Remove rules that an earlier run left behind; return how many sessions' worth."""
        ...

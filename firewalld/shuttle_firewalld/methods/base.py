"""The interface every firewall method implements: apply and remove one session's rules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # sessions.py imports this module, so only the type checker follows back
    from shuttle_firewalld.sessions import Session


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

    def remove(self, session: Session) -> None:
        """Remove exactly the session's rules, best effort, logging what fails; never raises."""
        ...

    def remove_stale(self) -> int:
        """Remove rules that an earlier run left behind; return how many sessions' worth."""
        ...

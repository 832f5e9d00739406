"""The Shortcuts bookkeeping on its own: the order in which a retired shortcut's pieces go
(ssh's forward, the rules, the client's copy of the listener), with firewalld's requests
recorded by a fake apply and masters already gone (no ssh to ask)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, List, Tuple

from shuttle_client.firewall_session import FirewallError
from shuttle_client.shortcuts import Entry, Shortcut, Shortcuts


class GoneMaster:
    """A master that has gone: its own forwards went with it."""

    closed = True


class Firewalld:
    """apply's fake: each request's entries, and whether every listener copy was still
    open when it came; refuses while refusing is set."""

    def __init__(self, listeners: List[socket.socket], refusing: bool = False) -> None:
        self.listeners = listeners
        self.refusing = refusing
        self.requests: List[Tuple[Tuple[Entry, ...], bool]] = []

    async def apply(self, entries: Tuple[Entry, ...]) -> object:
        self.requests.append((entries, all(sock.fileno() != -1 for sock in self.listeners)))
        if self.refusing:
            raise FirewallError("refused")
        return None


def shortcut(port: int, master: Any) -> Shortcut:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return Shortcut("198.18.2.2", port, listener.getsockname()[1], master, listener)


def made(firewalld: Firewalld, *active: Shortcut) -> Shortcuts:
    shortcuts = Shortcuts(firewalld.apply, lambda key: True)
    shortcuts.active = list(active)
    firewalld.listeners.extend(item.listener for item in active)
    return shortcuts


async def settle(shortcuts: Shortcuts) -> None:
    await asyncio.gather(*shortcuts._tasks)


def test_a_gone_master_s_shortcuts_go_even_once_no_more_are_made() -> None:
    """After MAX_REFUSED refusals no shortcut is made any more, but those in force still go
    with their master: a rule left would send connections into a backlog nobody takes."""

    async def main() -> None:
        master = GoneMaster()
        firewalld = Firewalld([])
        one = shortcut(80, master)
        shortcuts = made(firewalld, one)
        shortcuts.enabled = False  # as after MAX_REFUSED refusals
        shortcuts.master_gone(master)  # type: ignore[arg-type]
        await settle(shortcuts)
        assert shortcuts.active == []
        assert firewalld.requests == [((), True)]  # the rule went while the port was held
        assert one.listener.fileno() == -1

    asyncio.run(main())


def test_after_stop_a_gone_master_changes_no_rule() -> None:
    async def main() -> None:
        master = GoneMaster()
        firewalld = Firewalld([])
        one = shortcut(80, master)
        shortcuts = made(firewalld, one)
        await shortcuts.stop()
        shortcuts.master_gone(master)  # type: ignore[arg-type]
        await settle(shortcuts)
        assert firewalld.requests == []
        assert shortcuts.active == [one] and one.listener.fileno() != -1
        shortcuts.close()
        assert one.listener.fileno() == -1

    asyncio.run(main())


def test_a_refused_list_clears_the_rules_before_the_ports_are_let_go() -> None:
    """firewalld refuses the list without a new shortcut in it: every shortcut goes, and
    the copies of the listeners (which keep their ports from anyone else) stay until the
    request that removes the rules has been made."""

    async def main() -> None:
        master = GoneMaster()
        firewalld = Firewalld([], refusing=True)
        one, two = shortcut(80, master), shortcut(443, master)
        shortcuts = made(firewalld, one, two)
        assert not await shortcuts._sync()
        assert [entries for entries, _ in firewalld.requests] == [(one.entry, two.entry), ()]
        assert all(held for _, held in firewalld.requests)
        assert shortcuts.active == []
        assert one.listener.fileno() == two.listener.fileno() == -1

    asyncio.run(main())

"""-H: keep firewalld's hosts block equal to the host names the agent has found so far,
but the ssh server's own names."""

import asyncio
import logging
from typing import Collection, Optional, Set, Tuple

from .firewall_session import FirewallError, FirewallSession, FirewallUnavailable

log = logging.getLogger("shuttle")

# Names come in bursts (a file, then reverse lookups one after another): one request each
# burst rather than one per name.
BATCH_DELAY = 0.3

Entries = Tuple[Tuple[str, str], ...]


class HostsSync:
    """Sends the latest set of names, one request at a time; a refusal is logged once.

    The ssh server's own names (server_names) are left out, and that is logged once: the
    server says where its name points, and an entry there would send the next ssh (and any
    other program) to the address it chose. firewalld cannot know these names, and needs
    not: only the user's own client is fooled by them, and it is this one that drops them.
    """

    def __init__(self, firewall: FirewallSession, server_names: Collection[str] = ()) -> None:
        self.firewall = firewall
        self._server_names = frozenset(name.lower() for name in server_names)
        self._dropped: Set[str] = set()
        self._latest: Optional[Entries] = None
        self._task: Optional[asyncio.Task[None]] = None
        self._refused = False
        self.written: Entries = ()  # what the last request that firewalld took asked for
        self.found: Entries = ()  # the latest update's

    def update(self, entries: Entries) -> None:
        """Every name found so far (the agent's Hosts messages add up)."""
        dropped = {name for name, _ in entries if name.lower() in self._server_names}
        if dropped - self._dropped:
            self._dropped |= dropped
            log.warning(
                "the server gave an address for its own name %s: not written to the hosts file",
                ", ".join(sorted(dropped)),
            )
        self.found = self._latest = tuple(entry for entry in entries if entry[0] not in dropped)
        if not self._refused and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        await asyncio.sleep(BATCH_DELAY)
        while self._latest is not None:
            entries, self._latest = self._latest, None
            try:
                count = await self.firewall.set_hosts(entries)
            except FirewallUnavailable:
                return  # the session is being reopened: again() sends them to the next one
            except FirewallError as exc:
                log.warning("cannot add host names to the hosts file: %s", exc)
                self._refused = True
                return
            self.written = entries
            log.info("hosts file: %d of %d names from the server's side", count, len(entries))

    def again(self) -> None:
        """The firewall session was opened anew (firewalld restarted): its hosts block is
        empty, so send every name found so far once more."""
        self.written = ()
        if self.found:
            self.update(self.found)

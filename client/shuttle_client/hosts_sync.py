"""-H: keep firewalld's hosts block equal to the host names the agent has found so far."""

import asyncio
import logging
from typing import Optional, Tuple

from .firewall_session import FirewallError, FirewallSession, FirewallUnavailable

log = logging.getLogger("shuttle")

# Names come in bursts (a file, then reverse lookups one after another): one request each
# burst rather than one per name.
BATCH_DELAY = 0.3

Entries = Tuple[Tuple[str, str], ...]


class HostsSync:
    """Sends the latest set of names, one request at a time; a refusal is logged once."""

    def __init__(self, firewall: FirewallSession) -> None:
        self.firewall = firewall
        self._latest: Optional[Entries] = None
        self._task: Optional[asyncio.Task[None]] = None
        self._refused = False
        self.written: Entries = ()  # what the last request that firewalld took asked for
        self.found: Entries = ()  # the latest update's

    def update(self, entries: Entries) -> None:
        """Every name found so far (the agent's Hosts messages add up)."""
        self.found = self._latest = entries
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

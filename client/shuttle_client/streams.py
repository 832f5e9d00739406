"""--streams N: several ssh sessions to the same server, each with its own agent, and the
choice of one for each new connection or UDP flow.

One ssh channel carries at most its window (2 MiB in OpenSSH) per round trip, so on a
long, fast link a single session caps throughput whatever the kernel's TCP could do; N
sessions carry N windows. They share one firewall session: capture does not change.
"""

import asyncio
import itertools
from typing import Any, List, Tuple

from shuttle_agent.relay import Link

from .cli import Options
from .tunnel import Tunnel


class Streams:
    """The tunnels of one client; all of them must start, and losing one ends the client."""

    def __init__(self, options: Options) -> None:
        count = options.streams
        names = ["agent"] if count == 1 else [f"agent {i}/{count}" for i in range(1, count + 1)]
        self.tunnels = [Tunnel(options, name) for name in names]
        self._turn = itertools.count()

    async def start(self) -> None:
        """Start every tunnel at once; if one fails, stop them all and raise its error."""
        results = await asyncio.gather(
            *(tunnel.start() for tunnel in self.tunnels), return_exceptions=True
        )
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            await self.stop()
            raise failures[0]

    async def stop(self) -> None:
        await asyncio.gather(*(tunnel.stop() for tunnel in self.tunnels))

    @property
    def links(self) -> List[Link]:
        return [tunnel.link for tunnel in self.tunnels]

    @property
    def closed(self) -> List["asyncio.Future[Any]"]:
        """One future per tunnel, done when that tunnel's session is over."""
        return [link.closed for link in self.links]

    @property
    def agent_python(self) -> str:
        return self.tunnels[0].agent_python

    @property
    def agent_capabilities(self) -> Tuple[str, ...]:
        """What every agent can do (they are the same program, so normally all of it)."""
        first, *others = self.tunnels
        return tuple(
            c for c in first.agent_capabilities if all(c in t.agent_capabilities for t in others)
        )

    def pick(self) -> Link:
        """The link for a new channel: the one with the fewest open channels, taking turns
        between equals so that a burst of new connections spreads out."""
        links = self.links
        start = next(self._turn) % len(links)
        rotated = links[start:] + links[:start]
        return min(rotated, key=lambda link: len(link.mux.channels) + len(link.flows))

"""Questions to the agent about the server's side, and what the client makes of the answers:
its routes (--auto-nets), its resolvers (--dns) and host names (--auto-hosts)."""

import asyncio
import ipaddress
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from shuttle_agent.relay import Link
from shuttle_protocol.firewall_messages import ALL_PORTS, Target
from shuttle_protocol.schema import Message
from shuttle_protocol.stream_messages import (
    MAX_HOST_ENTRIES,
    MAX_ROUTES,
    GetHosts,
    GetNameservers,
    GetRoutes,
    Hosts,
    Nameservers,
    Routes,
)

log = logging.getLogger("shuttle")

ANSWER_TIMEOUT = 15.0

HostsCallback = Callable[[Tuple[Tuple[str, str], ...]], None]


class DiscoveryError(Exception):
    """The agent did not answer a question in time, or answered too much; text for the user."""


def routed_targets(networks: Sequence[str]) -> Tuple[Target, ...]:
    """The server's routes worth capturing: not default, loopback, link-local, multicast or
    unspecified, each network once, for all ports."""
    found: Dict[str, None] = {}
    for text in networks:
        network = ipaddress.ip_network(text)
        address = network.network_address
        if (
            network.prefixlen == 0
            or address.is_loopback
            or address.is_link_local
            or address.is_multicast
            or address.is_unspecified
        ):
            continue
        found[str(network)] = None
    return tuple((network, *ALL_PORTS) for network in found)


class Discovery:
    """The client's side of GetRoutes, GetNameservers and GetHosts on one link.

    An answer the client did not ask for is the agent's error: the link fails.
    """

    def __init__(self, link: Link) -> None:
        self.link = link
        self._routes: List[str] = []
        self._routes_done: Optional[asyncio.Future[Tuple[str, ...]]] = None
        self._nameservers: Optional[asyncio.Future[Tuple[str, ...]]] = None
        self._on_hosts: Optional[HostsCallback] = None
        self._hosts: Dict[Tuple[str, str], None] = {}

    def on_message(self, msg: Message) -> bool:
        """Take an answer; False if msg is not one (the caller handles it)."""
        if isinstance(msg, Routes):
            self._on_routes(msg)
        elif isinstance(msg, Nameservers):
            if self._nameservers is None or self._nameservers.done():
                self.link.fail("Nameservers that the client did not ask for")
            else:
                self._nameservers.set_result(msg.addresses)
        elif isinstance(msg, Hosts):
            self._on_host_entries(msg)
        else:
            return False
        return True

    async def routes(self) -> Tuple[str, ...]:
        """The networks the server routes, as the agent reports them."""
        self._routes_done = asyncio.get_running_loop().create_future()
        self.link.send(GetRoutes())
        return await self._wait(self._routes_done, "its routes")

    async def nameservers(self) -> Tuple[str, ...]:
        """The nameservers of the server's resolv.conf."""
        self._nameservers = asyncio.get_running_loop().create_future()
        self.link.send(GetNameservers())
        return await self._wait(self._nameservers, "its nameservers")

    def watch_hosts(self, seeds: Sequence[str], on_hosts: HostsCallback) -> None:
        """Ask for host names; on_hosts gets every name found so far, each time more come."""
        self._on_hosts = on_hosts
        self.link.send(GetHosts(tuple(seeds)))

    async def _wait(self, answer: "asyncio.Future[Tuple[str, ...]]", what: str) -> Tuple[str, ...]:
        waiting: List[asyncio.Future[Any]] = [answer, self.link.closed]
        done, _ = await asyncio.wait(
            waiting, timeout=ANSWER_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if answer in done:
            return answer.result()
        if self.link.closed.done():
            raise DiscoveryError(f"the tunnel closed while asking the server for {what}")
        raise DiscoveryError(f"the agent did not report {what} within {ANSWER_TIMEOUT:.0f} s")

    def _on_routes(self, msg: Routes) -> None:
        done = self._routes_done
        if done is None or done.done():
            self.link.fail("Routes that the client did not ask for")
            return
        self._routes.extend(msg.networks)
        if len(self._routes) > MAX_ROUTES:
            self.link.fail(f"more than {MAX_ROUTES} routes")
            done.set_exception(DiscoveryError(f"the server reported over {MAX_ROUTES} routes"))
        elif not msg.more:
            done.set_result(tuple(self._routes))

    def _on_host_entries(self, msg: Hosts) -> None:
        if self._on_hosts is None:
            self.link.fail("Hosts that the client did not ask for")
            return
        before = len(self._hosts)
        for entry in msg.entries:
            if len(self._hosts) >= MAX_HOST_ENTRIES:
                log.warning(
                    "more than %d host names from the server: the rest ignored", MAX_HOST_ENTRIES
                )
                break
            self._hosts[entry] = None
        if len(self._hosts) > before:
            self._on_hosts(tuple(self._hosts))

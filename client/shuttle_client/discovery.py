"""Questions to the agent about the server's side, and what the client makes of the answers:
its routes (--auto-nets), its resolvers (--dns) and host names (--auto-hosts)."""

import asyncio
import ipaddress
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from shuttle_agent.routes import read_routes
from shuttle_ends.relay import Link
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
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class DiscoveryError(Exception):
    """The agent did not answer a question in time, or answered too much; text for the user."""


# -N takes no route shorter than this from the server, unless the same network is given
# on the command line: a hostile server's 0.0.0.0/1 and 128.0.0.0/1 (or ::/1 and 8000::/1)
# would capture everything, as a default route does. /8 is the largest block one
# organisation holds (10.0.0.0/8 among them); an IPv6 /16 is more than any site or
# provider network (a site gets a /48, a provider a /32 or so), while shorter IPv6 routes
# are aggregates such as 2000::/3, the default route by another name.
MIN_PREFIX = {4: 8, 6: 16}
SHOWN_SKIPPED = 10  # skipped routes named in the log line; the count says how many in all


def own_networks() -> Tuple[Network, ...]:
    """The networks on this host's own links (routes without a gateway), as the kernel has
    them: a server's route over one would take the host's neighbours into the tunnel."""
    return tuple(ipaddress.ip_network(text) for text in read_routes(direct=True))


def routed_targets(
    networks: Sequence[str], own: Sequence[Network] = (), given: Sequence[Target] = ()
) -> Tuple[Target, ...]:
    """The server's routes worth capturing, each network once, for all ports. Never: the
    default, loopback, link-local, multicast or unspecified. Not unless the command line
    gives the same network (given): a route shorter than MIN_PREFIX, or one overlapping
    a network of this host's own links (own); each of those is logged."""
    asked = {target[0] for target in given}
    found: Dict[str, None] = {}
    skipped: Dict[str, str] = {}
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
        if str(network) not in asked:
            shortest = MIN_PREFIX[network.version]
            local = [net for net in own if net.version == network.version and net.overlaps(network)]
            if network.prefixlen < shortest:
                skipped[str(network)] = f"shorter than /{shortest}"
                continue
            if local:
                skipped[str(network)] = f"overlaps this host's {local[0]}"
                continue
        found[str(network)] = None
    if skipped:
        shown = [f"{net} ({why})" for net, why in list(skipped.items())[:SHOWN_SKIPPED]]
        log.info(
            "not capturing %d of the server's routes: %s%s; a network given on the command "
            "line is captured",
            len(skipped),
            ", ".join(shown),
            ", ..." if len(skipped) > SHOWN_SKIPPED else "",
        )
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

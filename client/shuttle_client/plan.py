"""What one run captures, once the tunnel is up: the command line's subnets and, with -N,
the server's routes; with --dns, which resolvers' queries and where they go instead."""

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

from shuttle_protocol.firewall_messages import Target

from .cli import Options, drop_ipv6
from .discovery import Discovery, own_networks, routed_targets
from .dns import Nameserver
from .resolvers import DNS_PORT, local_resolvers

log = logging.getLogger("shuttle")


class PlanError(Exception):
    """Nothing sensible to capture; the text is for the user."""


@dataclass(frozen=True)
class Plan:
    subnets: Tuple[Target, ...]
    dns: Tuple[str, ...]  # the resolvers whose port 53 is captured
    nameserver: Optional[Nameserver]  # where their queries go (None without --dns)


async def make_plan(options: Options, discovery: Discovery) -> Plan:
    """Ask the agent what the options need to know about the server's side."""
    subnets = options.subnets
    if options.auto_nets:
        routed = routed_targets(await discovery.routes(), own_networks(), subnets)
        if options.disable_ipv6:
            routed = drop_ipv6(routed)
        log.info(
            "the server routes %s", " ".join(net for net, _, _ in routed) if routed else "nothing"
        )
        subnets = tuple(dict.fromkeys(subnets + routed))
        if not subnets:
            raise PlanError("nothing to capture: the server reports no routes worth capturing")
    if not options.dns:
        return Plan(subnets, (), None)
    captured = options.ns_hosts or local_resolvers()
    if options.disable_ipv6:
        captured = tuple(address for address in captured if ":" not in address)
    if not captured:
        raise PlanError("--dns: this host has no nameserver in /etc/resolv.conf (use --ns-hosts)")
    server = options.to_ns
    if server is None:
        theirs = await discovery.nameservers()
        if not theirs:
            raise PlanError("--dns: the server has no nameserver in its resolv.conf (use --to-ns)")
        server = (theirs[0], DNS_PORT)
    log.info("DNS to %s goes to %s port %d on the server's side", " ".join(captured), *server)
    if options.dns_domains:
        log.info("only names in %s are asked there", ", ".join(options.dns_domains))
    return Plan(subnets, captured, Nameserver(captured, server, options.dns_domains))

"""This host's DNS resolvers, whose queries --dns captures.

Every `nameserver` of /etc/resolv.conf; where that is systemd-resolved's stub (127.0.0.53 or
127.0.0.54), also its upstreams, from the resolv.conf that systemd-resolved writes for
programs that bypass it: a program may ask those directly.
"""

import ipaddress
from typing import Tuple

from shuttle_ends.resolv import read_nameservers
from shuttle_protocol.checks import MAX_NAMESERVERS

DNS_PORT = 53
RESOLV_CONF = "/etc/resolv.conf"
RESOLVED_UPSTREAMS = "/run/systemd/resolve/resolv.conf"
RESOLVED_STUBS = ("127.0.0.53", "127.0.0.54")


def plain(text: str) -> str:
    """An IP address's canonical text; an IPv4-mapped IPv6 address as the IPv4 it maps.
    ValueError if text is no address."""
    address = ipaddress.ip_address(text)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def local_resolvers(
    resolv_conf: str = RESOLV_CONF, upstreams: str = RESOLVED_UPSTREAMS
) -> Tuple[str, ...]:
    """The resolvers local programs ask, at most MAX_NAMESERVERS of them."""
    # The agent reads the server's resolv.conf the same way.
    found = read_nameservers(resolv_conf)
    if any(address in RESOLVED_STUBS for address in found):
        found += [address for address in read_nameservers(upstreams) if address not in found]
    return tuple(found[:MAX_NAMESERVERS])

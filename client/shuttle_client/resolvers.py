"""This host's DNS resolvers, whose queries --dns captures.

Every `nameserver` of /etc/resolv.conf; where that is systemd-resolved's stub (127.0.0.53 or
127.0.0.54), also its upstreams, from the resolv.conf that systemd-resolved writes for
programs that bypass it: a program may ask those directly.
"""

import ipaddress
import logging
from typing import List, Sequence, Tuple

log = logging.getLogger("shuttle")

DNS_PORT = 53
RESOLV_CONF = "/etc/resolv.conf"
RESOLVED_UPSTREAMS = "/run/systemd/resolve/resolv.conf"
RESOLVED_STUBS = ("127.0.0.53", "127.0.0.54")
MAX_FILE = 64 * 1024  # resolv.conf is a few lines; never read a huge file whole
MAX_NAMESERVERS = 16  # as many as a firewall session takes


def plain(text: str) -> str:
    """An IP address's canonical text; an IPv4-mapped IPv6 address as the IPv4 it maps.
    ValueError if text is no address."""
    address = ipaddress.ip_address(text)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def nameservers(text: str) -> List[str]:
    """The nameserver addresses of a resolv.conf text, canonical, in order, once each.

    An IPv6 address with a zone (fe80::1%eth0) is skipped: the firewall matches addresses
    alone, and a link-local server is on this host's link anyway, not behind the tunnel.
    """
    found: List[str] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver" or "%" in words[1]:
            continue
        try:
            address = plain(words[1])
        except ValueError:
            continue
        if address not in found:
            found.append(address)
    return found


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read(MAX_FILE)
    except OSError as exc:
        log.debug("cannot read %s: %s", path, exc.strerror)
        return ""


def local_resolvers(
    resolv_conf: str = RESOLV_CONF, upstreams: str = RESOLVED_UPSTREAMS
) -> Tuple[str, ...]:
    """The resolvers local programs ask, at most MAX_NAMESERVERS of them."""
    found = nameservers(_read(resolv_conf))
    if any(address in RESOLVED_STUBS for address in found):
        found += [address for address in nameservers(_read(upstreams)) if address not in found]
    return tuple(found[:MAX_NAMESERVERS])


def parse_address_port(text: str, default_port: int) -> Tuple[str, int]:
    """'IP', 'IP:PORT', '[IPv6]:PORT' or a bare IPv6 address → (canonical IP, port).

    ValueError with a message for the user if it is none of those.
    """
    host, port_text = text, ""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not IP[:PORT]")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    try:
        address = plain(host)
    except ValueError:
        raise ValueError(f"{text!r} is not IP[:PORT]: {host!r} is not an IP address") from None
    if not port_text:
        return address, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} has an invalid port")
    return address, int(port_text)


def parse_addresses(words: Sequence[str]) -> Tuple[str, ...]:
    """Comma-separated IP addresses → canonical addresses, once each; ValueError if bad."""
    found: List[str] = []
    for word in words:
        for item in filter(None, (part.strip() for part in word.split(","))):
            if "%" in item:
                raise ValueError(f"{item!r}: an address with a zone cannot be captured")
            try:
                address = plain(item)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address") from None
            if address not in found:
                found.append(address)
    if len(found) > MAX_NAMESERVERS:
        raise ValueError(f"at most {MAX_NAMESERVERS} nameservers")
    return tuple(found)

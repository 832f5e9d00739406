"""The agent's answer to GetNameservers: the `nameserver` lines of the server's resolv.conf.

Loopback nameservers (127.0.0.53 of systemd-resolved, say) are reported too: the client
sends its DNS queries through the agent, and on the server they do answer.
"""

import ipaddress
import logging
from typing import Dict, Iterable, List

from shuttle_protocol.checks import MAX_NAMESERVERS

log = logging.getLogger("shuttle")

RESOLV_CONF = "/etc/resolv.conf"


def parse_nameservers(lines: Iterable[str]) -> List[str]:
    """The nameserver addresses of resolv.conf lines, in order, canonical, each once, at most
    MAX_NAMESERVERS; other lines, comments and addresses that do not parse are skipped."""
    found: Dict[str, None] = {}
    for line in lines:
        # As glibc reads it: the keyword starts the line, then blanks, then the address.
        if not line.startswith(("nameserver ", "nameserver\t")):
            continue
        fields = line.split()
        if len(fields) < 2:
            continue
        text = fields[1]
        # An IPv6 address with a scope id (fe80::1%eth0) names one of the server's
        # interfaces: meaningless on the client, and the protocol refuses scope ids.
        if "%" in text:
            continue
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            # The same server over IPv4; and Python 3.13 writes ::ffff:a.b.c.d differently
            # from earlier versions, so a client on another version would refuse the text.
            address = address.ipv4_mapped
        found[str(address)] = None
        if len(found) == MAX_NAMESERVERS:
            break
    return list(found)


def read_nameservers(path: str = RESOLV_CONF) -> List[str]:
    """The server's nameservers; none if the file is missing or unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as lines:
            return parse_nameservers(lines)
    except OSError as exc:
        log.info("cannot read the nameservers in %s: %s", path, exc.strerror or exc)
        return []

"""What to capture: sshuttle's subnet syntax, parsed into (network, first port, last port).

a.b.c.d[/width][:port[-port]]      10.1.0.0/16, 10.1.2.3:80, 10.1.0.0/16:8000-8099
[v6addr][/width][:port[-port]]     [2001:db8::]/32:443  (brackets when a port follows)
v6addr[/width]                     2001:db8::/32, ::/0
0/0, ::/0                          everything of that family
hostname[:port[-port]]             every address the name has, resolved at start
"""

import ipaddress
import re
import socket
import time
from pathlib import Path
from typing import Collection, Dict, Iterable, List, Optional, Tuple

from shuttle_protocol.firewall_messages import ALL_PORTS, Target

from .resolvers import DNS_PORT

# How long Scope keeps is_local's answer for an address: asking costs a UDP socket (11 µs,
# a twentieth of a connection's hand-over), and this host's addresses seldom change.
LOCAL_TTL = 1.0  # seconds
LOCAL_CACHE = 4096  # addresses kept at most; the cache starts over when it is full
_PORTS = r"(?::(?P<first>\d+)(?:-(?P<last>\d+))?)?"
_BRACKETED = re.compile(r"\[(?P<addr>[^\]]+)\](?P<width>/\d+)?" + _PORTS)
_PLAIN = re.compile(r"(?P<addr>[A-Za-z0-9._-]+)(?P<width>/\d+)?" + _PORTS)


class TargetError(ValueError):
    """A subnet that cannot be understood; the text names it."""


def parse_target(text: str) -> List[Target]:
    """One subnet argument → its targets (several for a host name with several addresses)."""
    entry = text.strip()
    if "%" in entry:
        raise TargetError(f"invalid subnet {text!r}: a scoped (%zone) address is link-local")
    match = _BRACKETED.fullmatch(entry) or _PLAIN.fullmatch(entry)
    if match is None:
        # A bare IPv6 address or network: no brackets, so no port.
        if ":" in entry and "[" not in entry:
            return [(_network(text, entry, ""), *ALL_PORTS)]
        raise TargetError(f"invalid subnet {text!r}: expected a.b.c.d[/width][:port[-port]]")
    ports = _ports(text, match.group("first"), match.group("last"))
    addr, width = match.group("addr"), match.group("width") or ""
    if addr == "0" and width == "/0":  # sshuttle's shorthand for 0.0.0.0/0
        addr = "0.0.0.0"  # noqa: S104 (a network to capture, not an address to bind)
    if _is_address(addr):
        return [(_network(text, addr, width), *ports)]
    if width:
        raise TargetError(f"invalid subnet {text!r}: a host name has no /width")
    return [(_network(text, address, ""), *ports) for address in _resolve(text, addr)]


def parse_targets(texts: Iterable[str]) -> Tuple[Target, ...]:
    """Every target of every argument, without duplicates, in order."""
    found: List[Target] = []
    for text in texts:
        found.extend(parse_target(text))
    return tuple(dict.fromkeys(found))


def describe(target: Target) -> str:
    """A target as the user writes it."""
    network, first, last = target
    if (first, last) == ALL_PORTS:
        return network
    ports = str(first) if first == last else f"{first}-{last}"
    return f"[{network}]:{ports}" if ":" in network else f"{network}:{ports}"


def endpoint(address: Tuple[str, int]) -> str:
    """host:port as users write it, IPv6 in brackets."""
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_local(host: str) -> bool:
    """Whether host is this host's own address (loopback included), as its routing says.

    Connecting a UDP socket sends nothing; it only looks up the route, whose source for a
    local destination is that address itself (firewalld asks the same way). Unlike a test
    bind(), this does not depend on net.ipv4.ip_nonlocal_bind. Loopback is asked apart:
    the route to 127.0.0.5 has the source 127.0.0.1.
    """
    if ipaddress.ip_address(host).is_loopback:
        return True
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
        except OSError:  # no route at all (or a broadcast address): not this host's
            return False
        return bool(probe.getsockname()[0] == host)


class _Networks:
    """Targets as a table for quick lookups: by IP version and prefix length, the network
    numbers and their port ranges (a few dict lookups per address, however many targets)."""

    def __init__(self, targets: Iterable[Target]) -> None:
        self.table: Dict[Tuple[int, int], Dict[int, List[Tuple[int, int]]]] = {}
        for network, first, last in targets:
            parsed = ipaddress.ip_network(network)
            key = int(parsed.network_address) >> (parsed.max_prefixlen - parsed.prefixlen)
            by_length = self.table.setdefault((parsed.version, parsed.prefixlen), {})
            by_length.setdefault(key, []).append((first, last))

    def covers(self, address: "ipaddress.IPv4Address | ipaddress.IPv6Address", port: int) -> bool:
        number, bits = int(address), address.max_prefixlen
        for (version, length), networks in self.table.items():
            if version == address.version:
                for first, last in networks.get(number >> (bits - length), ()):
                    if first <= port <= last:
                        return True
        return False


class Scope:
    """What a session captures, decided as its firewall rules decide it: port 53 of its
    nameservers; else, never this host's own addresses; else its subnets but the excludes.

    A connection or datagram that reaches the client with any other original destination
    was not captured: a program (or a host on the LAN, with a wildcard listener) sent it to
    the client's port itself, and relaying it would open that destination on the server's
    side for whoever asked. Whether an address is this host's own is asked again after
    LOCAL_TTL: an address the host has just taken may pass for a remote one that long.
    """

    def __init__(
        self, subnets: Iterable[Target], excludes: Iterable[Target], dns: Collection[str]
    ) -> None:
        self.subnets = _Networks(subnets)
        self.excludes = _Networks(excludes)
        self.dns = frozenset(dns)
        self._local: Dict[str, Tuple[bool, float]] = {}  # is_local's answers, until when

    def captures(self, destination: Tuple[str, int]) -> bool:
        host, port = destination
        if port == DNS_PORT and host in self.dns:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return False  # the kernel never gives those for a captured packet (V6ONLY)
        return (
            self.subnets.covers(address, port)
            and not self.excludes.covers(address, port)
            and not self._is_local(host)
        )

    def _is_local(self, host: str) -> bool:
        """is_local(host), as it was at most LOCAL_TTL ago."""
        now = time.monotonic()
        known = self._local.get(host)
        if known is not None and now < known[1]:
            return known[0]
        if len(self._local) >= LOCAL_CACHE:
            self._local.clear()
        local = is_local(host)
        self._local[host] = (local, now + LOCAL_TTL)
        return local


def read_target_file(path: str) -> List[str]:
    """Whitespace-separated subnets from a file; # starts a comment."""
    try:
        content = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TargetError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    words: List[str] = []
    for number, line in enumerate(content.splitlines(), 1):
        for word in line.split("#", 1)[0].split():
            try:
                parse_target(word)
            except TargetError as exc:
                raise TargetError(f"{path}, line {number}: {exc}") from None
            words.append(word)
    return words


def _network(text: str, addr: str, width: str) -> str:
    try:
        network = ipaddress.ip_network(addr + width, strict=False)
    except ValueError:
        raise TargetError(f"invalid subnet {text!r}: {addr + width} is not a network") from None
    if network.version == 6 and network.network_address.ipv4_mapped is not None:
        raise TargetError(f"invalid subnet {text!r}: IPv4-mapped; write it as IPv4")
    return str(network)


def _ports(text: str, first: Optional[str], last: Optional[str]) -> Tuple[int, int]:
    if first is None:
        return ALL_PORTS
    low, high = int(first), int(last if last is not None else first)
    if not 1 <= low <= high <= 65535:
        raise TargetError(f"invalid subnet {text!r}: ports must be 1-65535, first <= last")
    return low, high


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return text.replace(".", "").isdigit()  # "10.1" and the like: let the network say why
    return True


def _resolve(text: str, name: str) -> List[str]:
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise TargetError(f"cannot resolve {name!r} in subnet {text!r}: {exc}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))

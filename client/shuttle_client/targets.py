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
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from shuttle_protocol.firewall_messages import ALL_PORTS, Target

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

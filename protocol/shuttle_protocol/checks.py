"""Field checks used by the message constructors; each raises LocalProtocolError.

Decoding turns these into RemoteProtocolError, so the same check blames whoever built
the value. Explicit checks, never assert (python -O would remove them).
"""

import ipaddress
import re
from typing import Any, Tuple

from .errors import LocalProtocolError

MAX_TEXT = 4096


def _show(value: Any) -> str:
    # repr() of an int with more than 4300 digits raises ValueError (CVE-2020-10735 limit).
    try:
        return f"{value!r:.80}"
    except ValueError:
        return f"a {type(value).__name__} too long to show"


def check_int(value: Any, name: str, low: int, high: int) -> None:
    # bool is an int subclass; a peer's True must not pass as 1.
    if type(value) is not int or not low <= value <= high:
        shown = _show(value)
        raise LocalProtocolError(f"{name} must be an integer in [{low}, {high}], got {shown}")


def check_bool(value: Any, name: str) -> None:
    if type(value) is not bool:
        raise LocalProtocolError(f"{name} must be true or false, got {_show(value)}")


def check_number(value: Any, name: str, low: float, high: float) -> None:
    if type(value) not in (int, float) or not low <= value <= high:
        raise LocalProtocolError(f"{name} must be a number in [{low}, {high}], got {_show(value)}")


def check_text(value: Any, name: str, max_len: int = MAX_TEXT) -> None:
    if type(value) is not str or len(value) > max_len:
        raise LocalProtocolError(f"{name} must be text of at most {max_len} characters")


def check_bytes(value: Any, name: str, max_len: int) -> None:
    if type(value) is not bytes or len(value) > max_len:
        raise LocalProtocolError(f"{name} must be bytes of at most {max_len} bytes")


def check_text_tuple(value: Any, name: str, max_items: int, max_len: int = 64) -> None:
    if type(value) is not tuple or len(value) > max_items:
        raise LocalProtocolError(f"{name} must be a list of at most {max_items} items")
    for item in value:
        check_text(item, name + " item", max_len)


def check_choice(value: Any, name: str, choices: Tuple[str, ...]) -> None:
    if type(value) is not str or value not in choices:
        raise LocalProtocolError(f"{name} must be one of {', '.join(choices)}, got {_show(value)}")


def _refuse_mapped(address: Any, text: str, name: str) -> None:
    # Python 3.13 writes IPv4-mapped addresses as ::ffff:1.2.3.4, older ones as ::ffff:102:304,
    # so their canonical text depends on the peer's Python: they travel as plain IPv4.
    if address.version == 6 and address.ipv4_mapped is not None:
        raise LocalProtocolError(f"{name}: {text!r:.80} is IPv4-mapped: write it as IPv4")


def check_network(text: Any, name: str) -> None:
    """A strictly written network, such as '10.1.0.0/16' or '2001:db8::/32'."""
    check_text(text, name, 64)
    # Python >= 3.9 parses an IPv6 scope id ("fe80::%<any text>/64") and prints it back.
    if "%" in text:
        raise LocalProtocolError(f"{name}: {text!r:.80} has a scope id")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise LocalProtocolError(f"{name}: {exc}") from None
    _refuse_mapped(network.network_address, text, name)
    if str(network) != text:
        raise LocalProtocolError(f"{name}: {text!r} is not written canonically ({network})")


MAX_ADDRESS = 45  # the longest IPv6 address text, ffff:...:255.255.255.255


def check_address(text: Any, name: str) -> None:
    """A strictly written IP address, such as '10.1.2.3' or '2001:db8::7'."""
    check_text(text, name, MAX_ADDRESS)
    if "%" in text:
        raise LocalProtocolError(f"{name}: {text!r:.80} has a scope id")
    try:
        address = ipaddress.ip_address(text)
    except ValueError as exc:
        raise LocalProtocolError(f"{name}: {exc}") from None
    _refuse_mapped(address, text, name)
    if str(address) != text:
        raise LocalProtocolError(f"{name}: {text!r} is not written canonically ({address})")


MAX_NAMESERVERS = 16  # in a firewall session, and in the agent's Nameservers

MAX_HOSTNAME = 253
# RFC 1123 host names: labels of ASCII letters, digits and inner hyphens, 1-63 characters,
# joined by dots; the last label is not all digits (so no IP address passes as a name).
# Nothing else: these names end up in /etc/hosts, written by root.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?:{_LABEL}\.)*(?=[0-9-]*[A-Za-z-]){_LABEL}", re.ASCII)


def check_hostname(text: Any, name: str) -> None:
    """A host name as /etc/hosts may hold it, such as 'db1' or 'web.corp.example'."""
    check_text(text, name, MAX_HOSTNAME)
    if not _HOSTNAME.fullmatch(text):
        raise LocalProtocolError(f"{name}: {text!r:.80} is not a valid host name")


def check_hosts(value: Any, name: str, max_items: int) -> None:
    """A tuple of (host name, IP address) pairs."""
    if type(value) is not tuple or len(value) > max_items:
        raise LocalProtocolError(f"{name} must be a list of at most {max_items} items")
    for item in value:
        if type(item) is not tuple or len(item) != 2:
            raise LocalProtocolError(f"each of {name} is [host name, address]")
        check_hostname(item[0], f"{name} name")
        check_address(item[1], f"{name} address")


def check_addresses(value: Any, name: str, max_items: int) -> None:
    """A tuple of strictly written IP addresses."""
    if type(value) is not tuple or len(value) > max_items:
        raise LocalProtocolError(f"{name} must be a list of at most {max_items} items")
    for item in value:
        check_address(item, f"{name} item")

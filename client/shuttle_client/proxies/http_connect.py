"""An HTTP proxy's request parsing, server side, sans-IO: CONNECT host:port (a tunnel, for
https_proxy), and absolute-URI requests (http://host/path, for http_proxy), which are
forwarded to the target as origin-form requests, one per connection."""

import ipaddress
from dataclasses import dataclass
from typing import List, Tuple, Union

from shuttle_protocol.errors import RemoteProtocolError

from .socks5 import NEED_DATA, NeedData

MAX_HEAD = 16 * 1024  # request line and headers; past this the client gets a 431
MAX_HEADERS = 100
# Hop-by-hop headers (RFC 9110 section 7.6.1) and the proxy's own, not forwarded.
DROPPED = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"te"}
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


@dataclass(frozen=True)
class Connect:
    """CONNECT host:port: relay bytes both ways once the driver says 200."""

    host: str
    port: int


@dataclass(frozen=True)
class Forward:
    """A request for http://host:port/...: send head (origin-form) there, then relay."""

    host: str
    port: int
    head: bytes


Event = Union[NeedData, Connect, Forward]


class HttpProxyError(RemoteProtocolError):
    """A request the proxy cannot serve; response is what the client gets."""

    def __init__(self, status: int, reason: str, why: str) -> None:
        super().__init__(why)
        body = f"{why}\n".encode("ascii", "replace")
        self.response = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode("ascii") + body


def _bad(why: str) -> HttpProxyError:
    return HttpProxyError(400, "Bad Request", why)


def split_authority(text: str, default_port: int) -> Tuple[str, int]:
    """'host', 'host:port', '[v6]:port' → (host, port); HttpProxyError if it is none."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise _bad(f"invalid authority {text!r:.80}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad(f"invalid IPv6 address {host!r:.80}") from None
    else:
        host, _, port_text = text.partition(":")
        if not host or not all(c.isalnum() or c in "-._" for c in host):
            raise _bad(f"invalid host {host!r:.80}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _bad(f"invalid port {port_text!r:.80}")
    return host, int(port_text)


class HttpProxyServer:
    """One proxy client's request head; after the event, trailing holds what followed."""

    def __init__(self) -> None:
        self._buffer = b""
        self._done = False
        self.trailing = b""

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client."""
        if self._done:
            raise RemoteProtocolError("the request head was already read")
        self._buffer += data

    def next_event(self) -> Event:
        """NEED_DATA, Connect or Forward; HttpProxyError (its response for the client) if
        the head cannot be served."""
        if self._done:
            raise RemoteProtocolError("the request head was already read")
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                self._done = True
                raise HttpProxyError(431, "Request Header Fields Too Large", "head too large")
            return NEED_DATA
        self._done = True
        head, self.trailing = self._buffer[:end], self._buffer[end + 4 :]
        if end > MAX_HEAD:
            raise HttpProxyError(431, "Request Header Fields Too Large", "head too large")
        return self._parse(head)

    def _parse(self, head: bytes) -> Event:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] not in (b"HTTP/1.0", b"HTTP/1.1"):
            raise _bad("expected METHOD TARGET HTTP/1.x")
        method, target, version = parts
        if not method.isalpha() or not method.isupper():
            raise _bad(f"invalid method {method!r:.40}")
        headers = self._headers(lines[1:])
        try:
            text = target.decode("ascii")
        except UnicodeDecodeError:
            raise _bad("a request target that is not ASCII") from None
        if method == b"CONNECT":
            host, port = split_authority(text, 0)
            if not port:
                raise _bad("CONNECT needs host:port")
            return Connect(host, port)
        scheme, sep, rest = text.partition("://")
        if not sep:
            raise _bad("a proxy request needs an absolute URI (http://host/path)")
        if scheme.lower() != "http":
            raise HttpProxyError(501, "Not Implemented", f"scheme {scheme!r:.20}: use CONNECT")
        authority, _, path = rest.partition("/")
        host, port = split_authority(authority, 80)
        kept = [(name, value) for name, value in headers if name.lower() not in DROPPED]
        lines_out = [b" ".join((method, b"/" + path.encode("ascii"), version))]
        lines_out += [name + b": " + value for name, value in kept]
        # One request per connection: a next one may be for another host.
        lines_out.append(b"Connection: close")
        return Forward(host, port, b"\r\n".join(lines_out) + b"\r\n\r\n")

    @staticmethod
    def _headers(lines: List[bytes]) -> List[Tuple[bytes, bytes]]:
        if len(lines) > MAX_HEADERS:
            raise HttpProxyError(431, "Request Header Fields Too Large", "too many headers")
        headers = []
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or not name.replace(b"-", b"").isalnum():
                raise _bad(f"invalid header line {line!r:.80}")
            headers.append((name, value.strip()))
        return headers

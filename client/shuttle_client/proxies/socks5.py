"""SOCKS5 (RFC 1928) with optional username/password (RFC 1929), server side, sans-IO:
receive_data(bytes), next_event() → NEED_DATA or a Request, data_to_send() → bytes.
Domain names stay names (socks5h): the agent resolves them on the server's side."""

import hmac
import ipaddress
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from shuttle_protocol.errors import RemoteProtocolError

VERSION = 5
AUTH_VERSION = 1  # RFC 1929's subnegotiation
NO_AUTH = 0x00
USER_PASS = 0x02
NO_ACCEPTABLE = 0xFF
CONNECT = 0x01
BIND = 0x02
UDP_ASSOCIATE = 0x03
ATYP_IPV4 = 0x01
ATYP_NAME = 0x03
ATYP_IPV6 = 0x04
# Reply codes (RFC 1928 section 6).
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_NOT_SUPPORTED = 0x08


class NeedData:
    """More bytes are needed before the next event."""


NEED_DATA = NeedData()


@dataclass(frozen=True)
class Request:
    """The client asks for command to host:port (host: an IP address or a domain name)."""

    command: int
    host: str
    port: int


Event = Union[NeedData, Request]
Credentials = Tuple[bytes, bytes]

_GREETING, _AUTH, _REQUEST, _DONE, _ERROR = range(5)


def encode_address(host: str, port: int) -> bytes:
    """ATYP, address and port as a reply or a UDP header carries them."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("ascii")  # as _domain_name took it: idna refuses "a..b"
        return bytes((ATYP_NAME, len(name))) + name + port.to_bytes(2, "big")
    atyp = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
    return bytes((atyp,)) + address.packed + port.to_bytes(2, "big")


def decode_address(data: bytes, start: int) -> Optional[Tuple[str, int, int]]:
    """(host, port, end) of the address at data[start:] (port may be 0), None if it is not
    all there yet;
    RemoteProtocolError (with its reply code as args[1]) if it cannot be one."""
    if len(data) <= start:
        return None
    atyp = data[start]
    if atyp == ATYP_IPV4:
        end = start + 1 + 4
        packed = data[start + 1 : end]
    elif atyp == ATYP_IPV6:
        end = start + 1 + 16
        packed = data[start + 1 : end]
    elif atyp == ATYP_NAME:
        if len(data) <= start + 1:
            return None
        end = start + 2 + data[start + 1]
        packed = data[start + 2 : end]
    else:
        raise RemoteProtocolError(f"address type {atyp} is not one", ADDRESS_NOT_SUPPORTED)
    if len(data) < end + 2:
        return None
    port = int.from_bytes(data[end : end + 2], "big")
    if atyp == ATYP_NAME:
        host = _domain_name(packed)
    else:
        host = str(ipaddress.ip_address(packed))
    return host, port, end + 2


def _domain_name(raw: bytes) -> str:
    """A domain name as the agent may resolve it: printable ASCII letters, digits, - . _"""
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise RemoteProtocolError("a domain name that is not ASCII", HOST_UNREACHABLE) from None
    name = name.rstrip(".")
    if not name or not all(c.isalnum() or c in "-._" for c in name):
        raise RemoteProtocolError(f"invalid domain name {name!r:.80}", HOST_UNREACHABLE)
    return name


class Socks5Server:
    """One SOCKS5 client's negotiation, up to its request (then the driver replies)."""

    def __init__(self, credentials: Optional[Credentials] = None) -> None:
        """credentials: the (username, password) a client must give; None: no auth."""
        self._credentials = credentials
        self._state = _GREETING
        self._buffer = b""
        self._out = b""

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; RemoteProtocolError after an error."""
        if self._state == _ERROR:
            raise RemoteProtocolError("the negotiation already failed")
        self._buffer += data

    def data_to_send(self) -> bytes:
        """What to send the client now (method choice, auth status, an error reply)."""
        out, self._out = self._out, b""
        return out

    @property
    def trailing(self) -> bytes:
        """What the client sent after its request (its first data, if it did not wait)."""
        return self._buffer if self._state == _DONE else b""

    def next_event(self) -> Event:
        """NEED_DATA or the Request. RemoteProtocolError for bad input, once the error's
        reply is queued for data_to_send(); the negotiation is then over."""
        try:
            while self._state != _DONE:
                if not self._step():
                    return NEED_DATA
                if self._state == _DONE:
                    return self._request
            raise RemoteProtocolError("the request was already made")
        except RemoteProtocolError:
            self._state = _ERROR
            raise

    def reply(self, code: int, host: str = "0.0.0.0", port: int = 0) -> bytes:  # noqa: S104
        """The reply to the request (code SUCCEEDED or a failure), bound to host:port."""
        return bytes((VERSION, code, 0)) + encode_address(host, port)

    def _step(self) -> bool:
        if self._state == _GREETING:
            return self._greet(self._buffer)
        if self._state == _AUTH and self._credentials is not None:
            return self._authenticate(self._buffer, self._credentials)
        return self._read_request(self._buffer)

    def _greet(self, data: bytes) -> bool:
        if len(data) < 2:
            return False
        self._check_version(data[0])
        end = 2 + data[1]
        if len(data) < end:
            return False
        wanted = USER_PASS if self._credentials is not None else NO_AUTH
        if wanted not in data[2:end]:
            self._out += bytes((VERSION, NO_ACCEPTABLE))
            raise RemoteProtocolError(
                "the client offers no acceptable method"
                + (" (username/password is required)" if wanted == USER_PASS else "")
            )
        self._out += bytes((VERSION, wanted))
        self._buffer = data[end:]
        self._state = _AUTH if wanted == USER_PASS else _REQUEST
        return True

    def _read_request(self, data: bytes) -> bool:
        if len(data) < 4:
            return False
        self._check_version(data[0])
        if data[2] != 0:
            self._fail(GENERAL_FAILURE, "reserved byte is not 0")
        try:
            found = decode_address(data, 3)
        except RemoteProtocolError as exc:
            self._fail(exc.args[1], exc.args[0])
        if found is None:
            return False
        host, port, end = found
        if data[1] not in (CONNECT, UDP_ASSOCIATE):
            self._fail(COMMAND_NOT_SUPPORTED, f"command {data[1]} is not supported")
        # UDP ASSOCIATE may name port 0 (the client does not know its own yet); CONNECT not.
        if data[1] == CONNECT and not port:
            self._fail(HOST_UNREACHABLE, "CONNECT to port 0")
        self._request = Request(data[1], host, port)
        self._buffer = data[end:]
        self._state = _DONE
        return True

    def _authenticate(self, data: bytes, credentials: Credentials) -> bool:
        if len(data) < 2:
            return False
        if data[0] != AUTH_VERSION:
            raise RemoteProtocolError(f"username/password version {data[0]} is not 1")
        user_end = 2 + data[1]
        if len(data) < user_end + 1:
            return False
        end = user_end + 1 + data[user_end]
        if len(data) < end:
            return False
        user, password = credentials
        # Both compared, in constant time, so that timing tells nothing about either.
        good = hmac.compare_digest(data[2:user_end], user)
        good &= hmac.compare_digest(data[user_end + 1 : end], password)
        self._out += bytes((AUTH_VERSION, 0 if good else 1))
        if not good:
            raise RemoteProtocolError("wrong username or password")
        self._buffer = data[end:]
        self._state = _REQUEST
        return True

    def _check_version(self, version: int) -> None:
        if version != VERSION:
            raise RemoteProtocolError(f"SOCKS version {version} is not 5")

    def _fail(self, code: int, why: str) -> None:
        self._out += self.reply(code)
        raise RemoteProtocolError(why, code)

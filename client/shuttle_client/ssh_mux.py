"""The client's conversation with its own ssh ControlMaster (OpenSSH's PROTOCOL.mux), sans-IO:
messages to bytes and bytes to messages, bounded; no sockets here (fastpath.py drives it).

Every packet is a uint32 length, then a uint32 type and the body, in SSH wire format
(uint32 big-endian, string = uint32 length + bytes). Only what the fast path, the extra
agent sessions (agent_sessions.py) and the shortcuts (shortcuts.py) need is here: the
client sends Hello, NewStdioFwd, NewSession, AliveCheck, OpenLocalFwd and CloseLocalFwd;
the master answers Hello, SessionOpened, Failure, PermissionDenied, Alive, Ok and
ExitMessage. mux.c reads the connect port of a stdio forward as a uint32, whatever
PROTOCOL.mux says ("string connect port"); the code is what runs.
"""

import struct
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Iterator, List, Type, Union

from shuttle_protocol.errors import LocalProtocolError, RemoteProtocolError

MUX_VERSION = 4
MUX_MSG_HELLO = 0x00000001
MUX_C_NEW_SESSION = 0x10000002
MUX_C_ALIVE_CHECK = 0x10000004
MUX_C_OPEN_FWD = 0x10000006
MUX_C_CLOSE_FWD = 0x10000007
MUX_C_NEW_STDIO_FWD = 0x10000008
MUX_FWD_LOCAL = 1
MUX_S_OK = 0x80000001
MUX_S_PERMISSION_DENIED = 0x80000002
MUX_S_FAILURE = 0x80000003
MUX_S_EXIT_MESSAGE = 0x80000004
MUX_S_ALIVE = 0x80000005
MUX_S_SESSION_OPENED = 0x80000006
# The master's answers are a few dozen bytes; a Hello's extensions could be longer, but
# OpenSSH defines none. Anything past this is not a master we understand.
MAX_PACKET = 64 * 1024
MAX_HOST = 1025  # NI_MAXHOST; a destination is an address or a host name
MAX_COMMAND = 16 * 1024  # a session's command line (the agent's stage 1 is 2 KiB or so)
UINT32 = 2**32 - 1
NO_ESCAPE = UINT32  # a session's escape character: none


def _u32(value: int) -> bytes:
    return struct.pack(">I", value)


def _string(value: bytes) -> bytes:
    return _u32(len(value)) + value


class _Reader:
    """Fields of one packet body, in order; RemoteProtocolError when they run out."""

    def __init__(self, body: bytes, what: str) -> None:
        self.body = body
        self.at = 0
        self.what = what

    def u32(self) -> int:
        if self.at + 4 > len(self.body):
            raise RemoteProtocolError(f"{self.what}: truncated")
        (value,) = struct.unpack_from(">I", self.body, self.at)
        self.at += 4
        return int(value)

    def string(self) -> bytes:
        size = self.u32()
        if self.at + size > len(self.body):
            raise RemoteProtocolError(f"{self.what}: a string runs past the packet")
        value = self.body[self.at : self.at + size]
        self.at += size
        return value

    def text(self) -> str:
        return self.string().decode("utf-8", "replace")

    @property
    def left(self) -> int:
        return len(self.body) - self.at

    def end(self) -> None:
        if self.left:
            raise RemoteProtocolError(f"{self.what}: {self.left} bytes after the last field")


def _check_u32(value: object, name: str) -> None:
    if type(value) is not int or not 0 <= value <= UINT32:
        raise LocalProtocolError(f"{name} must be a uint32, got {value!r:.40}")


def _check_host(value: object, name: str) -> None:
    if type(value) is not str or not 0 < len(value.encode()) <= MAX_HOST:
        raise LocalProtocolError(f"{name} must be 1 to {MAX_HOST} bytes, got {value!r:.40}")
    if "\0" in value:
        raise LocalProtocolError(f"{name} must not contain NUL")


def _check_port(value: object, name: str) -> None:
    if type(value) is not int or not 1 <= value <= 65535:
        raise LocalProtocolError(f"{name} must be 1-65535, got {value!r:.40}")


@dataclass(frozen=True)
class Hello:
    """Either way, first on each connection: the protocol version (extensions ignored)."""

    TYPE: ClassVar[int] = MUX_MSG_HELLO
    version: int

    def __post_init__(self) -> None:
        _check_u32(self.version, "version")

    def body(self) -> bytes:
        return _u32(self.version)


@dataclass(frozen=True)
class NewStdioFwd:
    """Client → master: open a direct-tcpip channel to host:port on the two descriptors
    that follow, one per sendmsg with one byte each (mux.c's mm_receive_fd takes one)."""

    TYPE: ClassVar[int] = MUX_C_NEW_STDIO_FWD
    request_id: int
    host: str
    port: int

    def __post_init__(self) -> None:
        _check_u32(self.request_id, "request id")
        _check_host(self.host, "host")
        _check_port(self.port, "port")

    def body(self) -> bytes:
        return _u32(self.request_id) + _string(b"") + _string(self.host.encode()) + _u32(self.port)


@dataclass(frozen=True)
class OpenLocalFwd:
    """Client → master: listen on listen_host:listen_port and forward what connects there
    to host:port, as `ssh -L` does (the master's own forward, which outlives this mux
    connection); answered by Ok, or Failure "Port forwarding failed" (the port is taken)."""

    TYPE: ClassVar[int] = MUX_C_OPEN_FWD
    request_id: int
    listen_host: str
    listen_port: int
    host: str
    port: int

    def __post_init__(self) -> None:
        _check_u32(self.request_id, "request id")
        _check_host(self.listen_host, "listen host")
        _check_port(self.listen_port, "listen port")
        _check_host(self.host, "host")
        _check_port(self.port, "port")

    def body(self) -> bytes:
        return (
            _u32(self.request_id)
            + _u32(MUX_FWD_LOCAL)
            + _string(self.listen_host.encode())
            + _u32(self.listen_port)
            + _string(self.host.encode())
            + _u32(self.port)
        )


@dataclass(frozen=True)
class CloseLocalFwd(OpenLocalFwd):
    """Client → master: stop the forward that OpenLocalFwd opened with the same fields;
    answered by Ok, or Failure "port not forwarded"."""

    TYPE: ClassVar[int] = MUX_C_CLOSE_FWD


@dataclass(frozen=True)
class NewSession:
    """Client → master: open a session channel running command, without a tty, on the
    three descriptors that follow (stdin, stdout, stderr), one per sendmsg as for
    NewStdioFwd. mux.c reads the four flags and the escape character as uint32s."""

    TYPE: ClassVar[int] = MUX_C_NEW_SESSION
    request_id: int
    command: str

    def __post_init__(self) -> None:
        _check_u32(self.request_id, "request id")
        if type(self.command) is not str or not 0 < len(self.command.encode()) <= MAX_COMMAND:
            raise LocalProtocolError(f"command must be 1 to {MAX_COMMAND} bytes")
        if "\0" in self.command:
            raise LocalProtocolError("command must not contain NUL")

    def body(self) -> bytes:
        flags = _u32(0) * 4  # tty, X11, agent forwarding, subsystem: none
        return (
            _u32(self.request_id)
            + _string(b"")
            + flags
            + _u32(NO_ESCAPE)
            + _string(b"")  # terminal type
            + _string(self.command.encode())
        )


@dataclass(frozen=True)
class ExitMessage:
    """Master → client: the session's remote command exited with this status."""

    TYPE: ClassVar[int] = MUX_S_EXIT_MESSAGE
    session_id: int
    status: int


@dataclass(frozen=True)
class AliveCheck:
    """Client → master: are you there? Answered by Alive with the master's pid."""

    TYPE: ClassVar[int] = MUX_C_ALIVE_CHECK
    request_id: int

    def __post_init__(self) -> None:
        _check_u32(self.request_id, "request id")

    def body(self) -> bytes:
        return _u32(self.request_id)


@dataclass(frozen=True)
class SessionOpened:
    """Master → client: the forward's channel is open (the remote connect succeeded)."""

    TYPE: ClassVar[int] = MUX_S_SESSION_OPENED
    request_id: int
    session_id: int


@dataclass(frozen=True)
class Failure:
    """Master → client: the request failed; "Session open refused by peer" for any refused
    open, whether the destination refused or sshd forbids forwarding."""

    TYPE: ClassVar[int] = MUX_S_FAILURE
    request_id: int
    reason: str


@dataclass(frozen=True)
class PermissionDenied:
    """Master → client: refused by the master itself (ControlMaster=ask, say)."""

    TYPE: ClassVar[int] = MUX_S_PERMISSION_DENIED
    request_id: int
    reason: str


@dataclass(frozen=True)
class Alive:
    """Master → client: the answer to AliveCheck."""

    TYPE: ClassVar[int] = MUX_S_ALIVE
    request_id: int
    pid: int


@dataclass(frozen=True)
class Ok:
    """Master → client: a request without an answer of its own succeeded."""

    TYPE: ClassVar[int] = MUX_S_OK
    request_id: int


Request = Union[Hello, NewStdioFwd, NewSession, AliveCheck, OpenLocalFwd, CloseLocalFwd]
Answer = Union[Hello, SessionOpened, Failure, PermissionDenied, Alive, Ok, ExitMessage]


def encode(msg: Request) -> bytes:
    """One packet: length, type, body."""
    payload = _u32(msg.TYPE) + msg.body()
    return _u32(len(payload)) + payload


def _hello(reader: _Reader) -> Hello:
    version = reader.u32()
    while reader.left:  # extensions: name, value pairs; none are defined
        reader.string()
        reader.string()
    return Hello(version)


Parser = Callable[["_Reader"], Answer]


def _with_reason(cls: Type[Union[Failure, PermissionDenied]]) -> Parser:
    def parse(reader: _Reader) -> Answer:
        request_id, reason = reader.u32(), reader.text()
        reader.end()
        return cls(request_id, reason)

    return parse


def _two_ints(cls: Type[Union[SessionOpened, Alive, ExitMessage]]) -> Parser:
    def parse(reader: _Reader) -> Answer:
        first, second = reader.u32(), reader.u32()
        reader.end()
        return cls(first, second)

    return parse


def _ok(reader: _Reader) -> Answer:
    request_id = reader.u32()
    reader.end()
    return Ok(request_id)


# The answers a master may send, by type.
PARSERS: Dict[int, Parser] = {
    MUX_MSG_HELLO: _hello,
    MUX_S_SESSION_OPENED: _two_ints(SessionOpened),
    MUX_S_ALIVE: _two_ints(Alive),
    MUX_S_EXIT_MESSAGE: _two_ints(ExitMessage),
    MUX_S_FAILURE: _with_reason(Failure),
    MUX_S_PERMISSION_DENIED: _with_reason(PermissionDenied),
    MUX_S_OK: _ok,
}


class MuxDecoder:
    """Bytes from the master in, answers out. A packet over MAX_PACKET, an unknown type or
    a malformed body is RemoteProtocolError, after which the decoder refuses further use."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._broken = False

    def feed(self, data: bytes) -> List[Answer]:
        if self._broken:
            raise RemoteProtocolError("the mux connection already broke the protocol")
        self._buffer += data
        try:
            return list(self._packets())
        except RemoteProtocolError:
            self._broken = True
            raise

    def _packets(self) -> Iterator[Answer]:
        while len(self._buffer) >= 4:
            (size,) = struct.unpack_from(">I", self._buffer)
            if not 4 <= size <= MAX_PACKET:
                raise RemoteProtocolError(f"mux packet of {size} bytes (4 to {MAX_PACKET})")
            if len(self._buffer) < 4 + size:
                return
            payload = bytes(self._buffer[4 : 4 + size])
            del self._buffer[: 4 + size]
            (kind,) = struct.unpack_from(">I", payload)
            parser = PARSERS.get(kind)
            if parser is None:
                raise RemoteProtocolError(f"unexpected mux message type 0x{kind:08x}")
            yield parser(_Reader(payload[4:], f"mux message 0x{kind:08x}"))

    @property
    def pending(self) -> int:
        """Bytes of an incomplete packet."""
        return len(self._buffer)

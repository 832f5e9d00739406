"""The TCP fast path: captured connections handed to the ssh that runs the agent, which is a
ControlMaster on a private socket. For each one the client asks the master (ssh_mux.py) for
a stdio forward to the original destination, passing the accepted socket as both of its
descriptors; from then on ssh carries the bytes, as with ssh -L, and no Python touches them.

What mux.c does decides the shape (docs/design.md): one stdio forward per mux connection,
which must stay open while the forward lives (closing it closes the channel), and which the
master closes when the channel ends. So each master keeps a few mux connections ready
(connected, Hellos exchanged), refilled in the background: a hand-over is then one
NewStdioFwd, the two descriptors, and the answer. The client keeps its own copy of the
accepted socket: for the byte counts (TCP_INFO) and so that a master that dies cannot hand
the program a clean EOF. A closed mux connection is ambiguous (the forward ended, or the
master died and the kernel closed its descriptors), so the forwards that ended are closed
gracefully only once the master is known to have been alive after it closed them: the
kernel marks a process as exiting (PF_EXITING, in /proc/PID/stat) before it closes its
descriptors, so a master that is our ssh child and is not exiting closed them itself. But
a master whose server went away closes every channel while it still runs, before it exits
(clientloop.c: channel_free_all, in the order of their ids): the watch connection, made
before any forward, is then closed first, so a forward's end is graceful only while the
watch is open. Where the master is another process (the user's ControlPersist forks one),
it answers an AliveCheck sent after it closed them instead. Otherwise they are reset.
"""

import asyncio
import errno
import fcntl
import itertools
import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from shuttle_protocol.control_messages import Connection
from shuttle_protocol.errors import RemoteProtocolError

from . import ssh_mux
from .proxy import SPARE_FDS, connection_cap

log = logging.getLogger("shuttle")

TCP_MODES = ("auto", "ssh", "agent")
# Open forwards per master; the agent takes the rest. The master is one process that also
# carries the agent's session, and it slows down as it holds more channels (a hand-over took
# 2 ms at 200, 6.8 ms at 1,000 in issue 14's probe): 10,000 simultaneous echoes took 29.8 s
# with a cap of 200 against 10.5 s with 50 (docs/performance.md). Each forward also costs
# the master three descriptors and the client two.
DEFAULT_CAP = 50
# Hand-overs in flight per master: below the master's listen backlog of 64.
PARALLEL = 32
# Mux connections kept ready per master. Each idle one is a channel and a descriptor in
# the master; a few cover a burst while the refill catches up (past them, a hand-over
# connects its own, as without the pool).
POOL = 8
# The pool is refilled once it is down to this many: the master then takes the connects of
# a refill in one wakeup, not one after each hand-over (a sequential connect-echo-close
# 0.69x ssh -L's rate refilled at once, 0.75x by half: medians of ten, docs/performance.md).
REFILL_AT = POOL // 2
# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received, two u64 at 120.
TCP_INFO_BYTES = struct.Struct("=QQ")
TCP_INFO_OFFSET = 120
TCP_INFO_SIZE = TCP_INFO_OFFSET + TCP_INFO_BYTES.size
RECV_SIZE = 4096  # of the master's answers, a few dozen bytes each
FORWARD_TIMEOUT = 5.0  # seconds for a master to answer an open or close of its own forward
MIN_FD_LIMIT = 1024  # open files: below it, no fast path (cap_within_fd_limit)
UCRED = struct.Struct("3i")  # SO_PEERCRED's struct ucred: pid, uid, gid
# PF_EXITING (linux/sched.h): set on a process as it begins to exit, before the kernel closes
# its descriptors (do_exit: exit_signals, then exit_files).
PF_EXITING = 0x00000004


def cap_within_fd_limit(cap: int) -> int:
    """cap, or fewer under a low open-file limit: ssh inherits the client's limit and each
    forward costs it three descriptors, its pool and the agent's session more, and it holds
    those of forwards that ended here until their channels close; a master out of them drops
    the descriptors of a hand-over (ssh: "failed to receive fd"). Under a flood with a limit
    of 256 even a quarter of what is below the reserve ran out, so below MIN_FD_LIMIT the
    agent carries everything."""
    room = connection_cap()
    if room + SPARE_FDS < MIN_FD_LIMIT:
        return 0
    return max(0, min(cap, room // 4))


class MuxError(Exception):
    """The master could not be reached or broke its protocol; the text says how."""


CONTROL_PREFIX = "shuttle-ssh-"
LOCK_NAME = "lock"
# A directory with no lock file yet is one a client is making, unless it is older than this.
UNLOCKED_GRACE = 60.0  # seconds


class ControlDir:
    """A private (0700) directory for the masters' sockets: in $XDG_RUNTIME_DIR, else /tmp.
    Its path is short, because ssh adds 17 characters to it while it sets a socket up, and a
    unix socket's path has 107 bytes.

    The client holds a lock on a file in it for as long as it lives. ssh removes its sockets
    and the client the directory when it stops, but a killed client can do neither, so each
    new one first removes the directories of its uid whose lock nobody holds."""

    def __init__(self) -> None:
        base = os.environ.get("XDG_RUNTIME_DIR")
        if not base or not os.path.isdir(base) or len(base) > 60:
            base = None
        remove_stale_control_dirs(base or tempfile.gettempdir())
        self.path = tempfile.mkdtemp(prefix=CONTROL_PREFIX, dir=base)
        lock = os.open(os.path.join(self.path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Also run when the object goes away unstopped, or at exit.
        self._finalizer = weakref.finalize(self, _remove_control_dir, self.path, lock)

    def remove(self) -> None:
        self._finalizer()


def _remove_control_dir(path: str, lock: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.close(lock)


def remove_stale_control_dirs(base: str) -> None:
    """Remove the control directories in base of this uid that no living client holds."""
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(CONTROL_PREFIX) and _stale(entry):
            shutil.rmtree(entry.path, ignore_errors=True)


def _stale(entry: "os.DirEntry[str]") -> bool:
    try:
        info = entry.stat(follow_symlinks=False)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return False
    try:
        lock = os.open(os.path.join(entry.path, LOCK_NAME), os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return time.time() - info.st_mtime > UNLOCKED_GRACE
    except OSError:
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: its client lives
    finally:
        os.close(lock)
    return True


def master_options(path: str) -> Tuple[str, ...]:
    """ssh options that make it a ControlMaster on path; ControlPersist=no: it ends with the
    agent's session. ssh takes an option's first value, so options the user gave in -e win."""
    return (
        "-o",
        "ControlMaster=yes",
        "-o",
        f"ControlPath={path}",
        "-o",
        "ControlPersist=no",
    )


def tcp_bytes(sock: socket.socket) -> Tuple[int, int]:
    """(bytes the program sent, bytes it was sent and acknowledged) on an accepted socket."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    except OSError:
        return 0, 0
    if len(raw) < TCP_INFO_SIZE:  # an old kernel: no byte counters
        return 0, 0
    acked, received = TCP_INFO_BYTES.unpack_from(raw, TCP_INFO_OFFSET)
    return int(received), int(acked)


def open_stat(pid: int) -> Optional[int]:
    """A descriptor of /proc/PID/stat for running_since, None if pid is gone. It stays bound
    to that process: once it is reaped, reading gives ESRCH, whoever has its pid then."""
    try:
        return os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def running_since(stat_fd: int) -> Optional[int]:
    """The process's start time (clock ticks since boot) if it runs and is not exiting; None
    if it is exiting, a zombie, or gone. stat_fd: from open_stat (one read a call, where
    opening the file each time took three times as long)."""
    try:
        fields = os.pread(stat_fd, 4096, 0).rpartition(b")")[2].split()
        state, flags, start = fields[0], int(fields[6]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None
    if state in (b"Z", b"X") or flags & PF_EXITING:
        return None
    return start


def hung_up(sock: socket.socket) -> bool:
    """Whether the peer closed sock (or it broke), looking without taking what waits."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def reset(sock: socket.socket) -> None:
    """Close with a RST: once ssh's copies are gone too, the program sees a reset."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class MuxConnection:
    """One connection to the master's socket. Our Hello goes out with the first request, or
    alone on a pool connection, and the master's is read with the first answer, not a round
    trip before it: the master reads packets one at a time, each exactly, and takes the
    descriptors behind a request only when it handles that request."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = ssh_mux.MuxDecoder()
        self.greeted = False  # the master's Hello read
        self._answers: List[ssh_mux.Answer] = []

    @classmethod
    def connect_now(cls, path: str) -> "MuxConnection":
        """Connect and send Hello without waiting: a unix connect completes at once unless
        the master's backlog is full; MuxError if it does not, or fails."""
        sock = _mux_socket()
        try:
            sock.connect(path)
            _send_whole(sock, _greeting(None))
        except OSError as exc:
            sock.close()
            raise MuxError(f"cannot reach ssh's control socket: {exc.strerror or exc}") from None
        return cls(sock)

    @classmethod
    async def open(cls, path: str, request: Optional[ssh_mux.Request] = None) -> "MuxConnection":
        """As connect_now(), waiting for room where the master's backlog is full."""
        loop = asyncio.get_running_loop()
        sock = _mux_socket()
        try:
            await loop.sock_connect(sock, path)
            await loop.sock_sendall(sock, _greeting(request))
        except OSError as exc:
            sock.close()
            raise MuxError(f"cannot reach ssh's control socket: {exc.strerror or exc}") from None
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @classmethod
    async def ready(cls, path: str) -> "MuxConnection":
        """Connected, and the Hellos exchanged; MuxError if that fails."""
        mux = await cls.open(path)
        try:
            await mux.hello()
        except BaseException:
            mux.close()
            raise
        return mux

    def received(self, data: bytes) -> List[ssh_mux.Answer]:
        """The answers in what one read gave, the master's Hello taken off first; MuxError
        if the master closed (no data), broke the protocol, or greets with another version."""
        if not data:
            raise MuxError("ssh closed its control connection")
        try:
            answers = self.decoder.feed(data)
        except RemoteProtocolError as exc:
            raise MuxError(f"ssh's control socket broke the protocol: {exc}") from None
        if answers and not self.greeted:
            hello = answers.pop(0)
            if not isinstance(hello, ssh_mux.Hello) or hello.version != ssh_mux.MUX_VERSION:
                raise MuxError(f"ssh's control socket said {hello!r:.80}, not mux version 4")
            self.greeted = True
        return answers

    async def hello(self) -> None:
        """Wait for the master's Hello; MuxError if it is not version 4."""
        while not self.greeted:
            await self._read()

    async def answer(self) -> ssh_mux.Answer:
        """The next answer after the master's Hello; MuxError if the master closes or
        breaks the protocol."""
        while not self._answers:
            await self._read()
        return self._answers.pop(0)

    async def _read(self) -> None:
        try:
            data = await asyncio.get_running_loop().sock_recv(self.sock, RECV_SIZE)
        except OSError as exc:
            raise MuxError(f"ssh's control connection: {exc.strerror or exc}") from None
        self._answers += self.received(data)

    def send_request(self, request: ssh_mux.NewStdioFwd, fd: int) -> None:
        """request and fd as both of its descriptors, now; OSError if they do not go."""
        _send_whole(self.sock, ssh_mux.encode(request))
        self.send_fds(fd, 2)

    def send_fds(self, fd: int, count: int) -> None:
        """fd, count times, each in a sendmsg of its own with one byte: mux.c takes them
        one by one with mm_receive_fd, which expects exactly one descriptor per message."""
        for _ in range(count):
            socket.send_fds(self.sock, [b"\0"], [fd])

    def close(self) -> None:
        self.sock.close()


def _mux_socket() -> socket.socket:
    """A non-blocking unix socket for the master; MuxError if none can be had."""
    try:
        # Out of descriptors (EMFILE) is a failed open too: the agent takes it.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise MuxError(f"cannot reach ssh's control socket: {exc.strerror or exc}") from None
    if sock.fileno() >= connection_cap():
        # The reserve below the limit is for ssh, zmq and accept() (proxy.py), as for a
        # captured connection: taking it here would make the next accept fail.
        sock.close()
        raise MuxError("cannot reach ssh's control socket: near the open-file limit")
    sock.setblocking(False)
    return sock


def _send_whole(sock: socket.socket, packets: bytes) -> None:
    """packets in one send: a connection that has sent at most its Hello has room for a
    few dozen bytes at once, so a short send is a failure (BlockingIOError)."""
    if sock.send(packets) != len(packets):
        raise BlockingIOError(errno.EAGAIN, "the mux connection took part of the request")


def _greeting(request: Optional[ssh_mux.Request]) -> bytes:
    """Our Hello, and the request that goes with it, if any."""
    packets = ssh_mux.encode(ssh_mux.Hello(ssh_mux.MUX_VERSION))
    return packets + ssh_mux.encode(request) if request is not None else packets


@dataclass
class Forward:
    """A captured connection that ssh carries."""

    sock: socket.socket  # the client's copy of the accepted socket
    mux: MuxConnection
    stream: int
    channel: int
    source: str
    host: str
    port: int
    opened_at: float = field(default_factory=time.monotonic)

    def describe(self, now: float) -> Connection:
        up, down = tcp_bytes(self.sock)
        age = max(0.0, now - self.opened_at)
        return (
            self.channel,
            self.stream,
            "tcp-ssh",
            self.source,
            self.host,
            self.port,
            up,
            down,
            age,
        )


# Called with a forward that opened, and with one that closed, its byte counts beside.
Hook = Callable[[Forward], None]
CloseHook = Callable[[Forward, int, int], None]
# Called with why a hand-over failed; the socket is then the caller's again, untouched.
Refused = Callable[[str], None]


@dataclass
class Handing:
    """A hand-over whose request went out through a ready mux connection, its answer due."""

    sock: socket.socket
    mux: MuxConnection
    request_id: int
    source: str
    host: str
    port: int
    refused: Refused


class Master:
    """One ssh ControlMaster: hand-overs to it, the forwards it carries, and their end.

    A hand-over through a ready mux connection costs no task: its request goes out in the
    accept's turn of the loop, and reader callbacks take the answer and, later, the end.
    Per connection the client's loop had turned eight times and woken four tasks, and was
    the busiest process of a sequential connect-echo-close (docs/performance.md)."""

    def __init__(
        self,
        path: str,
        *,
        stream: int,
        cap: int,
        channels: "itertools.count[int]",
        on_open: Hook,
        on_close: CloseHook,
    ) -> None:
        self.path = path
        self.stream = stream
        self.cap = cap
        self.forwards: Dict[int, Forward] = {}
        self.handing = 0  # hand-overs in flight
        self.closed = False
        self._channels = channels
        self._on_open = on_open
        self._on_close = on_close
        self._requests = itertools.count(1)
        self._slots = asyncio.Semaphore(PARALLEL)
        self._watch: Optional[MuxConnection] = None
        # Where the master is our ssh: a descriptor of its /proc/PID/stat, its start time
        # then and its pid; its liveness (running_since) read without a round trip.
        self._liveness: Optional[Tuple[int, int, int]] = None
        self._ended: List[Forward] = []  # mux connection closed; is the master alive?
        self._wake = asyncio.Event()
        self._watcher: Optional[asyncio.Task[None]] = None
        self._ready: List[MuxConnection] = []  # connected, our Hello sent, unused
        self._pending: Dict[int, Handing] = {}  # by the mux connection's descriptor
        # Called once, as the master is found gone (or we stop): its own forwards, which
        # shortcuts.py gives hot destinations, went with it.
        self.on_gone: Callable[[Master], None] = lambda master: None

    @property
    def room(self) -> bool:
        """Whether a new connection may go through this master: it is up (start() is
        done), and below its cap."""
        up = self._watch is not None and not self.closed
        return up and len(self.forwards) + self.handing < self.cap

    async def start(self, ssh_pid: int = 0) -> None:
        """Connect the watch connection; MuxError if there is no master. ssh_pid: the ssh
        we started, our child (unreaped, its pid cannot be reused while we look)."""
        watch = await MuxConnection.ready(self.path)
        try:
            pid = UCRED.unpack(
                watch.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
            )[0]
        except OSError:
            pid = 0
        stat_fd = open_stat(pid) if pid and pid == ssh_pid else None
        if stat_fd is not None:
            since = running_since(stat_fd)
            if since is None:  # exiting already: the AliveCheck will say so
                os.close(stat_fd)
            else:
                self._liveness = stat_fd, since, pid
        self._watch = watch
        if self._liveness is None:
            self._watcher = asyncio.ensure_future(self._watch_loop())
        self._refill()

    def claim(self) -> None:
        """Count a hand-over from now, before it goes out: a burst accepted in one turn of
        the loop (thousands) must see the cap fill as it goes. hand_over() and
        open(claimed=True) count it down."""
        self.handing += 1

    def release(self) -> None:
        """A claim() that does not go on to a hand-over."""
        self.handing -= 1

    def hand_over(
        self, sock: socket.socket, host: str, port: int, source: str, refused: Refused
    ) -> bool:
        """Hand a claimed sock over for host:port now, through a ready mux connection:
        the request and the two descriptors go out in the caller's turn of the loop, not
        after whatever else the loop has to do first. False if no connection is ready or
        sending failed (sock is still the caller's, claimed: open() it). Once sent, either
        the forward opens or refused is called with why not (then sock is the caller's
        again, untouched: ssh never read from it)."""
        mux = self._ready.pop() if self._ready else None
        if mux is None:
            return False
        request = ssh_mux.NewStdioFwd(next(self._requests) & ssh_mux.UINT32, host, port)
        try:
            mux.send_request(request, sock.fileno())
        except OSError as exc:
            log.debug("ssh's control connection: %s", exc.strerror or exc)
            mux.close()
            return False
        handing = Handing(sock, mux, request.request_id, source, host, port, refused)
        self._pending[mux.sock.fileno()] = handing
        asyncio.get_running_loop().add_reader(mux.sock.fileno(), self._answered, handing)
        return True

    def _answered(self, handing: Handing) -> None:
        """The master's answer to a hand_over(), or part of it."""
        mux = handing.mux
        try:
            answers = mux.received(mux.sock.recv(RECV_SIZE))
        except BlockingIOError:
            return
        except OSError as exc:
            why = f"ssh's control connection: {exc.strerror or exc}"
        except MuxError as exc:
            why = str(exc)
        else:
            if not answers:
                return  # the Hello only, or part of a packet
            why = _refusal(answers[0], handing.request_id)
            if not why:
                self._settle(handing)
                self._carry(handing.sock, mux, handing.source, handing.host, handing.port)
                return
        asyncio.get_running_loop().remove_reader(mux.sock.fileno())
        self._settle(handing)
        mux.close()
        handing.refused(why)

    def _settle(self, handing: Handing) -> None:
        del self._pending[handing.mux.sock.fileno()]
        self.handing -= 1
        self._refill()

    async def open(
        self, sock: socket.socket, host: str, port: int, source: str, *, claimed: bool = False
    ) -> Optional[str]:
        """Hand sock over for host:port (claimed: counted by claim()): None once ssh
        carries it, else why not (then sock is still the caller's, untouched: ssh never
        read from it)."""
        mux, why = await self.request(sock, host, port, claimed=claimed)
        if mux is None:
            return why
        if self.closed:  # lost while we waited: the caller sends it elsewhere
            mux.close()
            return "the master is gone"
        self._carry(sock, mux, source, host, port)
        return None

    async def request(
        self, sock: socket.socket, host: str, port: int, *, claimed: bool = False
    ) -> Tuple[Optional[MuxConnection], str]:
        """A stdio forward of sock to host:port: its open mux connection, or None and why.
        Counted as handing until then (claimed: already)."""
        if not claimed:
            self.handing += 1
        try:
            async with self._slots:
                if self.closed:
                    return None, "the master is gone"
                return await self._request(sock, host, port)
        finally:
            self.handing -= 1
            self._refill()

    async def _request(
        self, sock: socket.socket, host: str, port: int
    ) -> Tuple[Optional[MuxConnection], str]:
        """Through a ready mux connection if there is one, else one of its own."""
        request = ssh_mux.NewStdioFwd(next(self._requests) & ssh_mux.UINT32, host, port)
        mux = self._ready.pop() if self._ready else None
        try:
            if mux is None:  # the Hello goes with the request: no round trip before it
                mux = await MuxConnection.open(self.path, request)
                mux.send_fds(sock.fileno(), 2)
            else:
                mux.send_request(request, sock.fileno())
            answer = await mux.answer()
        except (OSError, MuxError) as exc:
            if mux is not None:
                mux.close()
            return None, str(exc)
        except BaseException:
            if mux is not None:
                mux.close()
            raise
        why = _refusal(answer, request.request_id)
        if why:
            mux.close()
            return None, why
        return mux, ""

    async def local_forward(self, request: ssh_mux.OpenLocalFwd) -> Optional[str]:
        """Open (or close) a forward of the master's own, as ssh -L's: it listens on the
        request's listen address and carries what connects there to its host and port, for
        as long as the master lives (not this mux connection's). None once done, else why
        not."""
        try:
            mux = await MuxConnection.open(self.path, request)
        except MuxError as exc:
            return str(exc)
        try:
            answer = await asyncio.wait_for(mux.answer(), FORWARD_TIMEOUT)
        except MuxError as exc:
            return str(exc)
        except asyncio.TimeoutError:
            return f"no answer from ssh within {FORWARD_TIMEOUT:g} s"
        finally:
            mux.close()
        if isinstance(answer, ssh_mux.Ok) and answer.request_id == request.request_id:
            return None
        return _refusal(answer, request.request_id) or f"unexpected answer {answer!r:.80}"

    def next_request(self) -> int:
        """A request id for this master's mux connections."""
        return next(self._requests) & ssh_mux.UINT32

    @property
    def child_pid(self) -> Optional[int]:
        """The master's pid where it is our ssh child (its descriptors are then ours to
        reach, pidfd_getfd), else None."""
        return self._liveness[2] if self._liveness is not None else None

    def _refill(self) -> None:
        """Keep POOL mux connections ready while the master has room for their forwards,
        each connected and its Hello sent, here and now (the master's Hello is read with
        the answer to its request), once the pool is down to REFILL_AT. Done once a
        hand-over is answered: the master, one process, would take a refill's Hello before
        the request. One that fails (the master's backlog full) leaves the pool short until
        the next: the hand-overs connect their own meanwhile, and the watch connection is
        what finds a dead master."""
        if len(self._ready) > REFILL_AT:
            return
        while not self.closed and len(self._ready) < min(
            POOL, self.cap - len(self.forwards) - self.handing
        ):
            try:
                self._ready.append(MuxConnection.connect_now(self.path))
            except MuxError as exc:
                log.debug("ssh's control socket, keeping connections ready: %s", exc)
                return

    def _carry(
        self, sock: socket.socket, mux: MuxConnection, source: str, host: str, port: int
    ) -> None:
        forward = Forward(sock, mux, self.stream, next(self._channels), source, host, port)
        self.forwards[forward.channel] = forward
        # Replaces _answered's reader, if it had one: the same descriptor, no system call.
        asyncio.get_running_loop().add_reader(mux.sock.fileno(), self._mux_readable, forward)
        self._on_open(forward)

    def _mux_readable(self, forward: Forward) -> None:
        """The master closed the forward's mux connection (or sent what it never should)."""
        try:
            data = forward.mux.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:  # nothing is expected after SessionOpened: treat it as the end
            log.debug("channel %d: ssh sent %d unexpected bytes", forward.channel, len(data))
        asyncio.get_running_loop().remove_reader(forward.mux.sock.fileno())
        if self._liveness is None:
            self._ended.append(forward)
            self._wake.set()
        elif running_since(self._liveness[0]) != self._liveness[1]:
            log.debug("ssh's control socket: ssh exited")
            self.close()
        elif self._watch is not None and hung_up(self._watch.sock):
            log.debug("ssh's control socket: ssh is closing every channel")
            self.close()
        else:
            self._finish(forward, graceful=True)

    async def _watch_loop(self) -> None:
        """Where the master is not our ssh: prove it alive by an AliveCheck after forwards
        ended, then close them gracefully; reset everything when it is gone."""
        watch = self._watch
        if watch is None:
            return
        loop = asyncio.get_running_loop()
        try:
            while not self.closed:
                await self._wake.wait()
                self._wake.clear()
                batch, self._ended = self._ended, []
                request = next(self._requests) & ssh_mux.UINT32
                await loop.sock_sendall(watch.sock, ssh_mux.encode(ssh_mux.AliveCheck(request)))
                answer = await watch.answer()
                if not isinstance(answer, ssh_mux.Alive) or answer.request_id != request:
                    raise MuxError(f"unexpected answer to AliveCheck: {answer!r:.80}")
                for forward in batch:
                    self._finish(forward, graceful=True)
        except (OSError, MuxError) as exc:
            if not self.closed:
                log.debug("ssh's control socket: %s", exc)
            self.close()

    def _finish(self, forward: Forward, graceful: bool) -> None:
        if self.forwards.pop(forward.channel, None) is None:
            return
        up, down = tcp_bytes(forward.sock)
        if graceful:
            forward.sock.close()
        else:
            reset(forward.sock)
        try:
            asyncio.get_running_loop().remove_reader(forward.mux.sock.fileno())
        except (ValueError, RuntimeError):  # closed already, or the loop is gone
            pass
        forward.mux.close()
        self._on_close(forward, up, down)

    def totals(self) -> Tuple[int, int]:
        """Bytes up and down of the open forwards."""
        up = down = 0
        for forward in self.forwards.values():
            sent, received = tcp_bytes(forward.sock)
            up += sent
            down += received
        return up, down

    def close(self) -> None:
        """The master is gone (or we stop): every forward it carried is reset, and every
        hand-over still unanswered is refused."""
        if self.closed:
            return
        self.closed = True
        self.on_gone(self)
        if self.forwards:
            log.info("resetting %d connections that ssh carried", len(self.forwards))
        for forward in list(self.forwards.values()):
            self._finish(forward, graceful=False)
        for handing in list(self._pending.values()):
            try:
                asyncio.get_running_loop().remove_reader(handing.mux.sock.fileno())
            except (ValueError, RuntimeError):
                pass
            self._settle(handing)
            handing.mux.close()
            handing.refused("the master is gone")
        if self._watch is not None:
            self._watch.close()
        if self._liveness is not None:
            os.close(self._liveness[0])
            self._liveness = None
        for mux in self._ready:
            mux.close()
        self._ready.clear()
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        self._wake.set()


def _refusal(answer: ssh_mux.Answer, request_id: int) -> str:
    """Why answer does not open the forward of request_id; "" if it does."""
    if isinstance(answer, ssh_mux.SessionOpened) and answer.request_id == request_id:
        return ""
    if isinstance(answer, (ssh_mux.Failure, ssh_mux.PermissionDenied)):
        return answer.reason
    return f"unexpected answer {answer!r:.80}"


async def probe(master: Master, port: int) -> Optional[str]:
    """Whether sshd forwards TCP for us: a forward to the agent's probe listener on the
    server's 127.0.0.1:port. None if it opened (sshd confirms a direct-tcpip channel only
    once its connect succeeded), else why not."""
    if port == 0:
        return "the agent could not listen for the probe"
    ours, theirs = socket.socketpair()
    try:
        mux, why = await master.request(theirs, "127.0.0.1", port)
        if mux is not None:
            mux.close()  # which ends the forward
        return None if mux is not None else why
    finally:
        ours.close()
        theirs.close()

"""The client's side of the firewalld RPC: open a session, keep its lease, change what it
captures, close it, and for a tproxy session fetch the transparent sockets firewalld makes
for it; list the sessions firewalld shows us.

One zmq DEALER on firewalld's ipc socket, one request in flight at a time; answers are
matched to requests by id, and stale answers (to a request that timed out) are dropped.
Sockets come over a second, unix stream socket (the fd socket), for a one-time token.

A session lives in firewalld's memory: when firewalld stops or crashes, its connection drops
(a zmq monitor sees it at once) and the session is gone, whatever its lease said. While the
connection stands, a heartbeat waits for its answer however late: firewalld ends sessions
only in the loop that would answer, so a slow firewalld still holds our rules.
"""

from __future__ import annotations

import array
import asyncio
import grp
import ipaddress
import itertools
import logging
import math
import os
import pwd
import socket
import struct
from collections.abc import Sequence
from typing import Any, TypeVar, Union

import zmq
import zmq.asyncio
from shuttle_protocol.errors import ProtocolError
from shuttle_protocol.firewall_messages import (
    ALL_PORTS,
    ANY_OWNER,
    PAIRS,
    BypassSocketAnswer,
    BypassSocketRequest,
    CloseSessionAnswer,
    CloseSessionRequest,
    HeartbeatAnswer,
    HeartbeatRequest,
    ListSessionsAnswer,
    ListSessionsRequest,
    OpenSessionAnswer,
    OpenSessionRequest,
    ReplySocketAnswer,
    ReplySocketRequest,
    SessionEntry,
    SetHostsAnswer,
    SetHostsRequest,
    SetShortcutsAnswer,
    SetShortcutsRequest,
    SocketsAnswer,
    SocketsHandover,
    SocketsRequest,
    Target,
    UpdateSessionAnswer,
    UpdateSessionRequest,
)
from shuttle_protocol.frames import decode_frame
from shuttle_protocol.rpc import AnswerError, Caller
from shuttle_protocol.schema import Message
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("shuttle")

CLOSE_TIMEOUT = 1.0
# Heartbeats sent and not answered yet, at most: a stalled firewalld need not queue more.
MAX_UNANSWERED = 3
MAX_HANDOVER = 4096  # bytes of the one frame on the fd socket; it is a few dozen
MAX_FDS = 4  # descriptors in it: at most a TCP and a UDP socket per IP version
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

_MONITORS = itertools.count(1)

A = TypeVar("A", bound=Message)
Address = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]


def _target(item: Target | str) -> Target:
    """A target as the protocol carries it; a network alone means all its ports."""
    if isinstance(item, str):
        return (item, *ALL_PORTS)
    return (item[0], item[1], item[2])


def stop_monitor(socket: zmq.Socket[Any], monitor: zmq.Socket[Any]) -> None:
    """End socket's monitoring, then close monitor, its reader. In that order: libzmq's I/O
    thread sends each event with a blocking send, so one event for a reader already closed
    (the old connection's reconnect to a restarted firewalld, say) would hold that thread,
    and with it every connection of the context, for good."""
    socket.disable_monitor()
    monitor.close(linger=0)


class FirewallError(Exception):
    """firewalld refused or failed; str() is the user-facing text."""


class FirewallUnavailable(FirewallError):
    """firewalld cannot be reached, went away, did not answer, or we have no session with
    it now: unlike a refusal, waiting may change that."""


class FirewallSession:
    """One session with shuttle-firewalld: its rules stay while heartbeats keep coming."""

    def __init__(self, socket_path: str) -> None:
        self._path = socket_path
        self._socket: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        # Done once firewalld drops the connection of self._socket.
        self._gone: asyncio.Future[None] | None = None
        # Whether self._socket completed a handshake with firewalld: a request without an
        # answer then means a slow firewalld, not a missing one.
        self._greeted = False
        self._lock: asyncio.Lock | None = None  # made in the loop that uses it (Python 3.9)
        self._caller = Caller(PAIRS)
        self._session: str | None = None
        self._lease = 0.0

    def move(self, socket_path: str) -> None:
        """Talk to the firewalld at socket_path from now on (one started for us)."""
        self._drop_socket()
        self._path = socket_path

    @property
    def session(self) -> str | None:
        """The session id while the session is open."""
        return self._session

    async def open(  # noqa: PLR0917  (the request's fields, in its order; main passes them so)
        self,
        method: str,
        port: int,
        subnets: Sequence[Target | str],
        excludes: Sequence[Target | str],
        uid: int | None = None,
        gid: int = ANY_OWNER,
        forward: bool = False,
        timeout: float = 5.0,
        dns: Sequence[str] = (),
    ) -> str:
        """Ask firewalld to capture the subnets (minus excludes) into port; the method applied.

        subnets and excludes: (network, first port, last port) targets, or networks as text
        for all ports. uid: whose traffic (default: our own; ANY_OWNER: everybody's), gid: of
        which group (ANY_OWNER: any); forward: also traffic routed through this host; dns:
        nameservers whose port 53 is captured as well (UDP too, into port on loopback). More
        than our own traffic needs root or firewalld's policy file.
        """
        if self._session is not None:
            raise FirewallError("this firewall session is already open")
        request = OpenSessionRequest(
            method,
            port,
            tuple(map(_target, subnets)),
            tuple(map(_target, excludes)),
            os.getuid() if uid is None else uid,
            gid,
            forward,
            tuple(dns),
        )
        answer = await self._request(request, OpenSessionAnswer, timeout)
        self._session, self._lease = answer.session, answer.lease
        return answer.method

    async def tproxy_sockets(self, timeout: float = 5.0) -> tuple[int, dict[str, socket.socket]]:
        """The transparent sockets of this (tproxy) session: (their port, {kind: socket}),
        kinds "tcp4" and "udp4" if the session captures IPv4, "tcp6" and "udp6" for IPv6.

        TCP connections accepted on a "tcp" listener keep their original destination as
        their own address (getsockname()); each datagram on a "udp" socket carries it in
        IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR ancillary data. firewalld hands them over
        once per session; the caller owns them from now on.
        """
        answer = await self._request(SocketsRequest(self._open_session()), SocketsAnswer, timeout)
        sockets = await fetch_sockets(answer.path, answer.token, timeout)
        if any(kind == "reply" for kind, _ in sockets):
            _close_all(sockets)
            raise FirewallError("shuttle-firewalld handed over a reply socket for the listeners")
        return answer.port, dict(sockets)

    async def reply_socket(
        self, address: Address, port: int, program: tuple[str, int], timeout: float = 5.0
    ) -> socket.socket:
        """A transparent UDP socket bound to (address, port), an original destination inside
        this (tproxy) session's subnets, for the flow from program (its address and port, the
        captured datagrams' source): answers sent from it reach that program as coming from
        there, and firewalld lets it send nothing else. Keep it while the flow lives; the
        caller owns it."""
        try:
            request = ReplySocketRequest(
                self._open_session(), str(address), port, program[0], program[1]
            )
        except ProtocolError as exc:
            raise FirewallError(f"cannot ask for a reply socket: {exc}") from None
        answer = await self._request(request, ReplySocketAnswer, timeout)
        sockets = await fetch_sockets(answer.path, answer.token, timeout)
        if [kind for kind, _ in sockets] != ["reply"]:
            _close_all(sockets)
            raise FirewallError("shuttle-firewalld handed over something else than a reply socket")
        return sockets[0][1]

    async def bypass_socket(self, kind: str, timeout: float = 5.0) -> socket.socket:
        """A socket of ours (kind "udp4", "udp6", "tcp4" or "tcp6", unbound) that this
        session's DNS capture lets through to its nameservers' port 53 (firewalld marks it,
        which we cannot): for the queries --dns-domains leaves to them. The caller owns it."""
        answer = await self._request(
            BypassSocketRequest(self._open_session(), kind), BypassSocketAnswer, timeout
        )
        sockets = await fetch_sockets(answer.path, answer.token, timeout)
        if [name for name, _ in sockets] != ["bypass"]:
            _close_all(sockets)
            raise FirewallError("shuttle-firewalld handed over something else than a bypass socket")
        return sockets[0][1]

    async def set_hosts(self, hosts: Sequence[tuple[str, str]], timeout: float = 10.0) -> int:
        """Make this session's block of the hosts file hold these (name, address) entries;
        how many firewalld wrote (it skips names the file already has outside the block)."""
        try:
            request = SetHostsRequest(self._open_session(), tuple(hosts))
        except ProtocolError as exc:
            raise FirewallError(f"cannot set hosts: {exc}") from None
        answer = await self._request(request, SetHostsAnswer, timeout)
        return answer.count

    async def update(
        self,
        subnets: Sequence[Target | str],
        excludes: Sequence[Target | str],
        timeout: float = 10.0,
    ) -> int:
        """Make this session capture these subnets (minus these excludes) instead of the
        ones it had, all or nothing; how many rules it has now. The same forms as open();
        firewalld checks them as it does there."""
        try:
            request = UpdateSessionRequest(
                self._open_session(), tuple(map(_target, subnets)), tuple(map(_target, excludes))
            )
        except ProtocolError as exc:
            raise FirewallError(f"cannot update the firewall session: {exc}") from None
        answer = await self._request(request, UpdateSessionAnswer, timeout)
        return answer.rules

    async def set_shortcuts(
        self, shortcuts: Sequence[tuple[str, int, int]], limit: int, timeout: float = 10.0
    ) -> int:
        """Send this session's new connections to each (address, port) into its local port
        (a listener of ours on loopback), while at most limit of them are open (the new one
        included), instead of the session's port; these replace the ones it had. How many
        rules it has now."""
        try:
            request = SetShortcutsRequest(self._open_session(), tuple(shortcuts), limit)
        except ProtocolError as exc:
            raise FirewallError(f"cannot set shortcuts: {exc}") from None
        answer = await self._request(request, SetShortcutsAnswer, timeout)
        return answer.rules

    async def list_sessions(self, timeout: float = 5.0) -> tuple[SessionEntry, ...]:
        """The sessions firewalld shows us: our uid's own (root's caller: every session).
        Needs no open session."""
        answer = await self._request(ListSessionsRequest(), ListSessionsAnswer, timeout)
        return answer.sessions

    def _open_session(self) -> str:
        if self._session is None:
            raise FirewallUnavailable("no firewall session is open")
        return self._session

    async def run_heartbeats(self) -> None:
        """Renew the lease every third of it, until cancelled; FirewallError once the
        session is lost: firewalld says it has no such session (a restart, or the lease ran
        out), or it went away. An answer may come late: while firewalld's connection stands,
        the session may hold, and a heartbeat is sent again every third of the lease."""
        session = self._open_session()
        interval = self._lease / 3
        beat: asyncio.Future[HeartbeatAnswer] | None = None
        while True:
            try:
                await self._sleep_connected(interval)
                beat = asyncio.ensure_future(
                    self._request(HeartbeatRequest(session), HeartbeatAnswer, None, interval)
                )
                done, _ = await asyncio.wait([beat], timeout=self._lease)
                if not done:
                    log.warning(
                        "shuttle-firewalld has not answered a heartbeat for %g s: slow, not "
                        "gone (it is connected), so the session holds until it says otherwise",
                        self._lease,
                    )
                await beat
            except FirewallError:
                self._session = None
                raise
            finally:
                if beat is not None:
                    beat.cancel()
            if not done:
                log.info("shuttle-firewalld answers heartbeats again")

    async def close(self) -> None:
        """Close the session (best effort: its lease ends it anyway) and the socket."""
        try:
            if self._session is not None:
                # The outer bound covers waiting for a heartbeat that holds the socket.
                await asyncio.wait_for(
                    self._request(
                        CloseSessionRequest(self._session), CloseSessionAnswer, CLOSE_TIMEOUT
                    ),
                    CLOSE_TIMEOUT,
                )
        except (FirewallError, ProtocolError, zmq.ZMQError, OSError, asyncio.TimeoutError):
            pass  # nothing to tell: the rules go when the lease runs out
        finally:
            self._session = None
            self._drop_socket()

    def _drop_socket(self) -> None:
        if self._gone is not None:
            self._gone.cancel()  # before its monitor closes under it
            self._gone = None
        if self._socket is not None and self._monitor is not None:
            stop_monitor(self._socket, self._monitor)
        self._monitor = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    async def _request(
        self, request: Message, kind: type[A], timeout: float | None, resend: float = 0.0
    ) -> A:
        """Send one request and wait for its answer, of kind; an ErrorAnswer (or another
        answer) becomes FirewallError. timeout None: as long as firewalld stays connected.
        resend: send the request again (a new id) each time this many seconds pass without an
        answer, up to MAX_UNANSWERED copies; the answer to any of them counts."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            socket = self._connect()
            call = self._caller.call(request, kind)
            loop = asyncio.get_running_loop()
            deadline = math.inf if timeout is None else loop.time() + timeout
            next_send = loop.time()
            while (remaining := deadline - loop.time()) > 0:
                if loop.time() >= next_send:
                    await self._send(socket, call.frame(), min(remaining, resend or remaining))
                    more = resend and len(call.sent) < MAX_UNANSWERED
                    next_send = loop.time() + resend if more else math.inf
                data = await self._receive(socket, min(deadline, next_send) - loop.time())
                if data is None:
                    continue
                try:
                    answer = call.receive(data)
                except AnswerError as exc:
                    raise FirewallError(exc.from_peer("shuttle-firewalld")) from None
                if answer is not None:
                    return answer
            raise FirewallUnavailable(self._no_answer(timeout or 0.0))

    async def _send(self, socket: zmq.asyncio.Socket, frame: bytes, timeout: float) -> None:
        """Queue a request's frame."""
        try:
            # Sending only queues, unless the queue is full: bounded all the same.
            await asyncio.wait_for(socket.send(frame), timeout)
        except asyncio.TimeoutError:
            raise FirewallUnavailable(self._no_answer(timeout)) from None

    async def _receive(self, socket: zmq.asyncio.Socket, timeout: float) -> bytes | None:
        """The next frame within timeout seconds (None if none came);
        FirewallUnavailable if firewalld drops the connection meanwhile."""
        gone = self._gone
        receiving = asyncio.ensure_future(socket.recv())
        waiting: list[asyncio.Future[Any]] = [receiving] if gone is None else [receiving, gone]
        try:
            done, _ = await asyncio.wait(
                waiting,
                timeout=None if math.isinf(timeout) else max(timeout, 0.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            receiving.cancel()  # not left to take the answer meant for the next request
        if receiving in done:
            return bytes(receiving.result())
        if gone is not None and gone.done():
            raise FirewallUnavailable(self._dropped())
        return None

    async def _sleep_connected(self, seconds: float) -> None:
        """Sleep, but FirewallUnavailable as soon as firewalld drops the connection."""
        gone = self._gone
        if gone is None:
            await asyncio.sleep(seconds)
            return
        await asyncio.wait([gone], timeout=seconds)
        if gone.done():
            raise FirewallUnavailable(self._dropped())

    def _connect(self) -> zmq.asyncio.Socket:
        if self._gone is not None and self._gone.done():
            self._drop_socket()  # that firewalld is gone: its successor needs a new connection
        if self._socket is not None:
            return self._socket
        # libzmq connects in the background and retries quietly, so check what it cannot say.
        if not os.path.exists(self._path):
            raise FirewallUnavailable(self._unreachable())
        if not os.access(self._path, os.R_OK | os.W_OK):
            raise FirewallError(self._not_allowed())
        socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        socket.linger = 0
        # Before connect(), so that no drop of the connection goes unseen. A name of our
        # own: pyzmq's default names it by a descriptor number, which a successor may reuse.
        self._monitor = socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED,
            f"inproc://firewalld-monitor-{next(_MONITORS)}",
        )
        try:
            socket.connect("ipc://" + self._path)
        except zmq.ZMQError as exc:
            stop_monitor(socket, self._monitor)
            self._monitor = None
            socket.close()
            raise FirewallUnavailable(f"{self._unreachable()}: {exc}") from None
        self._socket = socket
        self._greeted = False
        self._gone = asyncio.ensure_future(self._until_dropped(self._monitor))
        return socket

    async def _until_dropped(self, monitor: zmq.asyncio.Socket) -> None:
        """Returns once the monitored socket's connection drops; notes its handshake."""
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return
            self._greeted = True

    def _not_allowed(self) -> str:
        try:
            group = grp.getgrgid(os.stat(self._path).st_gid).gr_name
        except (OSError, KeyError):
            group = "its group"
        return (
            f"no permission to use shuttle-firewalld at {self._path}: only root and the "
            f"members of {group} may (an admin adds you with: usermod -aG {group} "
            f"{_user_name()}, then log in again)"
        )

    def _dropped(self) -> str:
        return f"shuttle-firewalld at {self._path} dropped the connection (it stopped or restarted)"

    def _no_answer(self, timeout: float) -> str:
        if self._greeted:
            return (
                f"shuttle-firewalld at {self._path} took the connection but did not answer "
                f"within {timeout:g} s (it is busy or stalled; try again)"
            )
        return (
            f"cannot reach shuttle-firewalld at {self._path}: no answer within {timeout:g} s "
            "(is it running? start it as root: shuttle-firewalld)"
        )

    def _unreachable(self) -> str:
        return (
            f"cannot reach shuttle-firewalld at {self._path}: is it running? "
            "(start it as root: shuttle-firewalld)"
        )


def _user_name() -> str:
    """Our user's name (the uid if it has none)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


async def fetch_sockets(path: str, token: str, timeout: float) -> list[tuple[str, socket.socket]]:
    """The sockets a token fetches on firewalld's fd socket at path, with their kinds."""
    try:
        return await asyncio.wait_for(_fetch(path, token), timeout)
    except asyncio.TimeoutError:
        raise FirewallUnavailable(
            f"shuttle-firewalld did not hand the sockets over on {path} within {timeout:g} s"
        ) from None
    except OSError as exc:  # not listening (any more): it stopped, say
        raise FirewallUnavailable(
            f"cannot fetch the sockets from shuttle-firewalld on {path}: {exc.strerror or exc}"
        ) from None


async def _fetch(path: str, token: str) -> list[tuple[str, socket.socket]]:
    loop = asyncio.get_running_loop()
    received: list[int] = []  # descriptors not yet inside a socket object
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.setblocking(False)
            await loop.sock_connect(conn, path)
            _pid, uid, _gid = _UCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
            if uid != 0:  # firewalld runs as root: anyone else there is an impostor
                raise FirewallError(f"{path} is not shuttle-firewalld's: its owner is uid {uid}")
            await loop.sock_sendall(conn, token.encode("ascii"))
            data = await _receive(loop, conn, received)
        if not data:
            raise FirewallError(
                "shuttle-firewalld refused to hand the sockets over (token used, expired, or "
                "not ours: its log says which)"
            )
        try:
            _, handover = decode_frame(data)
        except ProtocolError as exc:
            raise FirewallError(f"shuttle-firewalld sent a malformed handover: {exc}") from None
        if not isinstance(handover, SocketsHandover) or len(handover.kinds) != len(received):
            raise FirewallError(
                f"shuttle-firewalld sent {len(received)} descriptors with {handover!r:.200}"
            )
        sockets: list[tuple[str, socket.socket]] = []
        try:
            for kind in handover.kinds:
                sockets.append((kind, socket.socket(fileno=received[0])))
                del received[0]
        except OSError:
            _close_all(sockets)
            raise
        return sockets
    finally:
        for fd in received:
            os.close(fd)


async def _receive(loop: asyncio.AbstractEventLoop, conn: socket.socket, fds: list[int]) -> bytes:
    """Everything up to the end of the connection, bounded; descriptors go to fds."""
    data = bytearray()
    while True:
        await _readable(loop, conn)
        try:
            # MSG_CMSG_CLOEXEC: the descriptors must not leak into programs we start.
            chunk, ancillary, flags, _ = conn.recvmsg(
                MAX_HANDOVER + 1 - len(data),
                socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize),
                socket.MSG_CMSG_CLOEXEC,
            )
        except BlockingIOError:
            continue
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                descriptors = array.array("i")
                descriptors.frombytes(payload[: len(payload) - len(payload) % descriptors.itemsize])
                fds.extend(descriptors)
        if flags & socket.MSG_CTRUNC:
            raise FirewallError(f"shuttle-firewalld sent more than {MAX_FDS} descriptors")
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > MAX_HANDOVER:
            raise FirewallError(f"shuttle-firewalld sent a handover over {MAX_HANDOVER} bytes")


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():  # the reader may fire again before we remove it
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def _close_all(sockets: list[tuple[str, socket.socket]]) -> None:
    for _, sock in sockets:
        sock.close()

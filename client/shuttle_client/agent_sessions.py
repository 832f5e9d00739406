"""More agent sessions over one ssh connection, where one session channel's window caps the
agent's path: OpenSSH opens a session channel with a 2 MiB window each way, so one session
carries at most 2 MiB per round trip (52 MB/s at 40 ms) whatever the link could do.

The ssh that runs the agent is a ControlMaster on a private socket (fastpath.master_options).
Each extra session is one MUX_C_NEW_SESSION on a mux connection of its own (PROTOCOL.mux),
with three pipes of ours as its stdin, stdout and stderr: an agent of its own, uploaded as
the first one is, in a session channel with its own windows, over the same TCP connection
and login. mux.c ties the session to that mux connection (closing it ends the session), so
it stays open while the session lives, and the master's ExitMessage or EOF on it ends ours.

How many: every WATCH_INTERVAL the client takes what each session carried (Data bytes, the
busier way) times the base round trip of its in-flight controller: a bandwidth-delay product
per session. A session whose product reaches SATURATED of the ssh window is held back by
that window; the client then wants as many sessions as the products add up to, in windows'
worth at SATURATED, plus SPARE with room (connections that come in a burst spread over them,
and the next measure can show whether the link carries more), up to MAX_SESSIONS.

A quiet lane: a session that carried BUSY_RATE or more is busy, and while every session is
busy the client wants one more. An interactive connection that shares a session with a bulk
transfer waits behind that session's bytes in flight in every buffer on the way (our pipe,
ssh's channel, sshd's, the agent's pipe); in a session of its own it waits only behind the
TCP connection's queue, as with ssh -L. On the bench's plain network that took the echo
during an upload from 7.0x its idle round trip to 3.9x. New channels go to a session that
is not busy, the one with the fewest channels among those (streams.pick), so connections
spread; an open channel stays where it is. A session stops being busy as soon as the bulk
channels that made it so have closed, not only at the next measure: a burst of connections
right after a bulk transfer (iperf3 -P after another run, a download manager) would crowd
into the sessions that happened to be quiet, and stay there.

Where ssh is not a ControlMaster (not OpenSSH, ControlMaster refused) the first NewSession
fails and the tunnel keeps its one session, as before.
"""

import asyncio
import logging
import math
import os
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple

from shuttle_ends.relay import Link
from shuttle_protocol.errors import RemoteProtocolError
from shuttle_protocol.inflight import BULK_TARGET, MIN_TARGET
from shuttle_protocol.stream_messages import Pace

from . import ssh_mux
from .cli import Options
from .fastpath import RECV_SIZE, MuxConnection, MuxError
from .logs import printable
from .tunnel import Tunnel, TunnelError
from .upload import remote_command

log = logging.getLogger("shuttle")

SSH_WINDOW = 2 * 1024 * 1024  # OpenSSH's CHAN_SES_WINDOW_DEFAULT: a session's window each way
# Of SSH_WINDOW per round trip: the window is what holds the session back. ssh -L's own
# connections reach 0.7-0.8 of a window per round trip through the bench's relay, ours as
# much; a LAN's product is a few percent of it.
SATURATED = 0.5
SPARE = 2  # sessions with room, beyond what the products fill
MAX_SESSIONS = 8  # per ssh connection, the first one included: each is an agent on the server
# Data bytes per second, the busier way, that make a session busy: a bulk transfer (a git
# clone, a download), far above an interactive session's or a video call's few hundred KB/s.
BUSY_RATE = 8 * 1000 * 1000
WATCH_INTERVAL = 0.5  # seconds between two measures
# A channel that has carried this much, either way, is a bulk one: what a busy session
# carries in one measure, and more than an interactive session carries in a long while.
BULK_BYTES = BUSY_RATE * WATCH_INTERVAL
# Bulk channels watched per busy session at most: every new connection looks at them.
MAX_WATCHED = 64


def wanted_sessions(
    products: Sequence[float], busy: Sequence[bool], window: int = SSH_WINDOW
) -> int:
    """How many sessions the measured bandwidth-delay products (bytes, one per session) ask
    for: as many as there are while none is held back by its window; else enough windows'
    worth, at SATURATED, for all of it, and SPARE more, at most MAX_SESSIONS. And one more,
    a quiet lane, if all of them are busy."""
    if len(busy) != len(products):
        raise ValueError("one busy flag per product")
    share = SATURATED * window
    wanted = len(products)
    if any(product >= share for product in products):
        wanted = max(wanted, min(MAX_SESSIONS, math.ceil(sum(products) / share) + SPARE))
    if wanted == len(products) and busy and all(busy):
        wanted = max(wanted, min(MAX_SESSIONS, wanted + 1))
    return wanted


def bulk_channels(carried: Mapping[int, int]) -> Optional[FrozenSet[int]]:
    """Of a busy session's open channels (bytes each carried, both ways), the bulk ones,
    whose closing ends its being busy; None if there is none (many small transfers or UDP
    made it busy) or more than MAX_WATCHED: then it is busy until the next measure."""
    bulk = frozenset(channel for channel, count in carried.items() if count >= BULK_BYTES)
    return bulk if 0 < len(bulk) <= MAX_WATCHED else None


def pace(links: Sequence[Link], alone: bool) -> None:
    """A bulk transfer alone on the ssh connection (nothing else carried a byte in the last
    measure, no UDP flow open) may queue up to BULK_TARGET, which it needs for its speed;
    while anything else shares the connection, every session allows the least, MIN_TARGET,
    both ways: our controller here, the agent's by Pace."""
    floor = BULK_TARGET if alone else MIN_TARGET
    for link in links:
        if link.in_flight.floor != floor and not link.closed.done():
            link.in_flight.set_floor(floor)
            link.send(Pace(round(floor * 1_000_000)))


def carried(link: Link) -> Dict[int, int]:
    """The bytes each open channel of a link carried, both ways."""
    return {channel: relay.bytes_in + relay.bytes_out for channel, relay in link.channels.items()}


class SessionTunnel(Tunnel):
    """An agent in a session that ssh's ControlMaster opened: no ssh process of its own."""

    def __init__(self, options: Options, name: str, control_path: str) -> None:
        super().__init__(options, name, control=control_path)
        self._mux: Optional[MuxConnection] = None
        self._ended = ""  # how the master ended the session

    async def _start(self) -> None:
        command = remote_command(self.options.python, self.options.verbose)
        request = ssh_mux.NewSession(1, command)
        try:
            self._mux = mux = await MuxConnection.open(self.control_path, request)
        except MuxError as exc:
            raise TunnelError(str(exc)) from None
        pipes: List[Tuple[int, int]] = []
        try:
            for _ in range(3):
                pipes.append(os.pipe())
        except OSError as exc:
            _close([fd for pipe in pipes for fd in pipe])
            raise TunnelError(f"cannot make the session's pipes: {exc.strerror}") from None
        (in_read, in_write), (out_read, out_write), (err_read, err_write) = pipes
        ours = [in_write, out_read, err_read]
        theirs = [in_read, out_write, err_write]  # the session's stdin, stdout, stderr
        try:
            for fd in theirs:
                mux.send_fds(fd, 1)
            await mux.hello()
            answer = await mux.answer()
        except (OSError, MuxError) as exc:
            _close(ours)
            raise TunnelError(f"ssh's control socket: {exc}") from None
        except BaseException:
            _close(ours)
            raise
        finally:
            _close(theirs)  # the master has its copies
        if not isinstance(answer, ssh_mux.SessionOpened):
            _close(ours)
            why = answer.reason if isinstance(answer, ssh_mux.Failure) else repr(answer)
            raise TunnelError(f"ssh did not open a session: {printable(why):.200}")
        asyncio.get_running_loop().add_reader(mux.sock.fileno(), self._mux_readable)
        await self._run_agent(*ours)

    def _mux_readable(self) -> None:
        """The master ended the session (ExitMessage), or closed the connection, or broke
        its protocol: our session ends with it."""
        mux = self._mux
        if mux is None:
            return
        try:
            data = mux.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        try:
            answers = mux.decoder.feed(data) if data else []
        except RemoteProtocolError as exc:
            answers, data = [], b""
            self._ended = f"ssh's control socket broke the protocol: {exc}"
        for answer in answers:
            if isinstance(answer, ssh_mux.ExitMessage):
                self._ended = f"the agent's session ended (status {answer.status})"
        if not data or self._ended:
            self._ended = self._ended or "ssh closed the session's control connection"
            asyncio.get_running_loop().remove_reader(mux.sock.fileno())
            self.link.finish(self._ended)

    async def _why_it_ended(self) -> str:
        return self._ended or "the agent's session ended before its greeting"

    async def stop(self) -> None:
        await super().stop()
        mux, self._mux = self._mux, None
        if mux is not None:
            try:
                asyncio.get_running_loop().remove_reader(mux.sock.fileno())
            except ValueError:  # closed already
                pass
            mux.close()


def _close(fds: List[int]) -> None:
    for fd in fds:
        os.close(fd)


class AgentSessions:
    """The extra sessions of one tunnel (its ssh connection), and the measure that decides
    how many there are."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.extra: List[SessionTunnel] = []
        self.refused = ""  # why ssh opens no more sessions ("" while it may)
        self._counts: Dict[Link, Tuple[int, int]] = {}  # Data bytes each way at the last measure
        # The links that carried BUSY_RATE at the last measure, with their bulk channels.
        self._busy: Dict[Link, Optional[FrozenSet[int]]] = {}
        # The bytes of the busy links' other channels at the last measure: those that moved
        # since are interactive traffic beside a bulk transfer.
        self._small: Dict[Tuple[Link, int], int] = {}
        self._task: Optional[asyncio.Task[None]] = None

    @property
    def extra_links(self) -> List[Link]:
        """The links of the extra sessions that are up."""
        return [session.link for session in self.extra if session.up]

    @property
    def busy(self) -> Set[Link]:
        """The links busy at the last measure that still have one of its bulk channels open
        (or had none to watch)."""
        return {
            link
            for link, channels in self._busy.items()
            if channels is None or any(channel in link.channels for channel in channels)
        }

    def start(self) -> None:
        """Measure and open sessions while the tunnel is up (nothing without a master)."""
        if self.tunnel.control_path:
            self._task = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(session.stop() for session in self.extra))
        self.extra.clear()

    async def _watch(self) -> None:
        while self.tunnel.up and not self.refused:
            await asyncio.sleep(WATCH_INTERVAL)
            self.extra = [session for session in self.extra if session.up]
            links = [self.tunnel.link, *self.extra_links]
            if len(links) < self.measure(links):
                await self._open(len(links) + 1)

    def measure(self, links: Sequence[Link]) -> int:
        """Take the measure of the links since the last one (WATCH_INTERVAL ago): note the
        busy ones and their bulk channels, and pace them; how many sessions are wanted."""
        rates = [self._rate(link) for link in links]
        counts = {link: carried(link) for link, rate in zip(links, rates) if rate >= BUSY_RATE}
        self._busy = {link: bulk_channels(counted) for link, counted in counts.items()}
        quiet = [rate for link, rate in zip(links, rates) if link not in counts]
        small = {
            (link, channel): count
            for link, counted in counts.items()
            for channel, count in counted.items()
            if count < BULK_BYTES
        }
        moved = any(count != self._small.get(key, 0) for key, count in small.items())
        self._small = small
        flows = any(link.flows for link in links)
        pace(links, alone=bool(counts) and not any(quiet) and not moved and not flows)
        products = [rate * (link.in_flight.base_rtt or 0.0) for link, rate in zip(links, rates)]
        return wanted_sessions(products, [link in self._busy for link in links])

    def _rate(self, link: Link) -> float:
        """The Data bytes per second the link carried since the last measure, the busier way."""
        mux = link.mux
        now = (mux.sent_total, mux.received_total)
        before = self._counts.get(link, now)
        self._counts[link] = now
        return max(now[0] - before[0], now[1] - before[1]) / WATCH_INTERVAL

    async def _open(self, number: int) -> None:
        name = f"{self.tunnel.link.peer} session {number}"
        session = SessionTunnel(self.tunnel.options, name, self.tunnel.control_path)
        try:
            await session.start()
        except (TunnelError, OSError) as exc:
            self.refused = str(exc)
            log.info("%s: one agent session only: %s", self.tunnel.link.peer, exc)
            return
        log.debug("%s: opened (the ssh window held the others back, or all were busy)", name)
        self.extra.append(session)

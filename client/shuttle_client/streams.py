"""The client's ssh sessions to the server: --streams N of them, each with its own agent; the
choice of one for each new connection or UDP flow; and bringing a lost one back.

One ssh channel carries at most its window (2 MiB in OpenSSH) per round trip, so on a
long, fast link a single session caps throughput whatever the kernel's TCP could do; N
sessions carry N windows. They share one firewall session: capture does not change. With
one stream (the default) its ssh opens more agent sessions itself, as many as the measured
bandwidth-delay product asks for, and a quiet lane beside bulk transfers (agent_sessions.py);
new channels spread over all of them.

A stream is lost when ssh ends or its agent stops answering pings. Its connections are
reset, and it is started again with backoff under the same firewall session: the rules
stay, so captured traffic still comes to us and cannot leave by another path (the kill
switch). A connection that arrives while no stream is up waits for one (proxy.Waiting) up
to --wait-tunnel seconds, then is reset; a datagram is dropped.
"""

import asyncio
import itertools
import logging
import os
import socket
import time
from typing import Any, Callable, Coroutine, Dict, List, Optional, Set, Tuple

from shuttle_ends.relay import Link
from shuttle_protocol.control_messages import (
    ChannelClosed,
    ChannelOpened,
    Connected,
    Connection,
    Disconnected,
    Reconnecting,
)
from shuttle_protocol.schema import Message

from .agent_sessions import AgentSessions
from .cli import Options
from .fastpath import ControlDir, Forward, Master, cap_within_fd_limit, reset
from .listing import Listed
from .proxy import Destination, Incoming, NotCaptured, Waiting, relay_for
from .shortcuts import Shortcuts
from .targets import endpoint
from .tunnel import Tunnel, TunnelError

log = logging.getLogger("shuttle")

BACKOFF_FIRST = 1.0  # seconds before the first attempt to bring a stream back
BACKOFF_MAX = 30.0  # the delay doubles after each failed attempt, up to this
MAX_WAITING = 10_000  # connections held while no stream is up; more are reset at once


def no_events(event: Message) -> None:
    """Where events go without a control socket."""


class Streams:
    """The tunnels of one client: all of them must start; each is brought back when lost,
    unless reconnecting is off, when losing one ends the client."""

    def __init__(self, options: Options, publish: Callable[[Message], None] = no_events) -> None:
        self.options = options
        self.publish = publish
        count = options.streams
        self.names = (
            ["agent"] if count == 1 else [f"agent {i}/{count}" for i in range(1, count + 1)]
        )
        # The TCP fast path, and more agent sessions on one stream: each ssh a ControlMaster
        # on a socket in this private directory.
        self.fast = options.tcp != "agent"
        self.control_dir = ControlDir() if self.fast or options.streams == 1 else None
        self.sessions: Dict[int, AgentSessions] = {}  # by stream, with one stream only
        self._fast_channels = itertools.count(1)
        # A socket name per ssh: an old master that exits late removes its own name only.
        self._masters_started = itertools.count(1)
        self.tunnels = [self._tunnel(index) for index in range(count)]
        self.reconnects = 0
        # Done, with the reason, when a stream is lost for good (reconnecting is off).
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        # ssh options for reconnecting (main sets them: with --dns, ssh must not need DNS).
        self.reconnect_ssh: Tuple[str, ...] = ()
        # Called with the stream's index each time a stream comes back.
        self.on_reconnected: Callable[[int], None] = lambda index: None
        self.closed_bytes = [0, 0]  # up, down: of the channels closed so far
        self._waiting: Set[Waiting] = set()
        self._turn = itertools.count()
        self._tasks: Set[asyncio.Task[Any]] = set()
        self._stopping = False
        # Hot destinations straight into ssh's own forwards; main gives it the firewall
        # session, once that is open with a method that can redirect into them.
        self.shortcuts: Optional[Shortcuts] = None

    async def start(self) -> None:
        """Start every tunnel at once; if one fails, stop them all and raise its error.
        Then keep each one up."""
        results = await asyncio.gather(
            *(tunnel.start() for tunnel in self.tunnels), return_exceptions=True
        )
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            await self.stop()
            raise failures[0]
        for index in range(len(self.tunnels)):
            self.publish(Connected(index, self.options.ssh_destination))
            self._open_sessions(index)
            self._spawn(self._keep(index)).add_done_callback(self._kept)
        self._release_waiting()  # captured while the agents started (main's _bring_up)

    async def connected(self) -> None:
        """Wait until every stream's ssh is connected: its master answered, or its agent
        greeted (start() may still be waiting for the rest)."""
        for tunnel in self.tunnels:  # shielded: cancelling this must not cancel theirs
            await asyncio.shield(tunnel.connected)

    async def stop(self) -> None:
        self._stopping = True
        if self.shortcuts is not None:  # first: a master that goes now changes no rule
            await self.shortcuts.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._waiting:
            log.info("resetting %d connections that waited for the tunnel", len(self._waiting))
        for waiting in list(self._waiting):
            waiting.give_up("the client is stopping")
        await asyncio.gather(*(sessions.stop() for sessions in self.sessions.values()))
        await asyncio.gather(*(tunnel.stop() for tunnel in self.tunnels))
        if self.control_dir is not None:
            self.control_dir.remove()

    def _tunnel(self, index: int, ssh_options: Tuple[str, ...] = ()) -> Tunnel:
        if self.control_dir is None:
            return Tunnel(self.options, self.names[index], ssh_options)
        path = os.path.join(self.control_dir.path, f"m{index}.{next(self._masters_started)}")
        master = None
        if self.fast:
            master = Master(
                path,
                stream=index,
                cap=cap_within_fd_limit(self.options.tcp_cap),
                channels=self._fast_channels,
                on_open=self._forward_opened,
                on_close=self._forward_closed,
            )
            master.on_gone = self._master_gone
        return Tunnel(self.options, self.names[index], ssh_options, master, control=path)

    def _open_sessions(self, index: int) -> None:
        """With one stream, let its ssh open more agent sessions as the link asks."""
        if len(self.tunnels) == 1:
            self.sessions[index] = sessions = AgentSessions(self.tunnels[index])
            sessions.start()

    def _links(self, index: int) -> List[Link]:
        """The stream's links: its tunnel's, then its extra sessions' that are up."""
        sessions = self.sessions.get(index)
        return [self.tunnels[index].link, *(sessions.extra_links if sessions else ())]

    # -- keeping them up -------------------------------------------------------------------

    async def _keep(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST / 2  # doubled below: the first loss waits BACKOFF_FIRST
        while True:
            tunnel = self.tunnels[index]
            up_since = loop.time()
            keepalive = asyncio.ensure_future(tunnel.keepalive(self.options.keepalive))
            try:
                # Shielded: cancelling this task (stop) must not cancel the link's own future,
                # or the link's finish() would take it as done and skip closing the pipe.
                reason = await asyncio.shield(tunnel.link.closed) or "closed"
            finally:
                keepalive.cancel()
            sessions = self.sessions.pop(index, None)
            if sessions is not None:
                await sessions.stop()
            await tunnel.stop()
            log.warning("lost the tunnel (%s): %s", tunnel.link.peer, reason)
            self.publish(Disconnected(index, reason[:1000]))
            if not self.options.reconnect:
                if not self.lost.done():
                    self.lost.set_result(reason)
                return
            # A stream that breaks soon after it came back (an agent that keeps failing, say)
            # goes on backing off where it was; one that stayed up starts afresh.
            stayed_up = loop.time() - up_since >= BACKOFF_MAX
            delay = BACKOFF_FIRST if stayed_up else min(delay * 2, BACKOFF_MAX)
            delay = await self._reconnect(index, delay)

    async def _reconnect(self, index: int, delay: float) -> float:
        """Bring the stream back, after delay seconds, doubling it after each failed
        attempt; the delay of the attempt that worked."""
        name = self.names[index]
        attempt = 0
        while True:
            attempt += 1
            log.info("reconnecting %s in %g s (attempt %d)", name, delay, attempt)
            self.publish(Reconnecting(index, attempt, delay))
            await asyncio.sleep(delay)
            tunnel = self._tunnel(index, self.reconnect_ssh)
            try:
                await tunnel.start()
            except TunnelError as exc:
                log.warning("reconnecting %s failed: %s", name, exc)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            except OSError as exc:  # out of file descriptors for the pipes, say: try again
                log.warning("reconnecting %s failed: %s", name, exc.strerror or exc)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            self.tunnels[index] = tunnel
            self._open_sessions(index)
            self.reconnects += 1
            log.info("reconnected %s (agent on python %s)", name, tunnel.agent_python)
            self.publish(Connected(index, self.options.ssh_destination))
            self.on_reconnected(index)
            self._release_waiting()
            return delay

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> "asyncio.Task[Any]":
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _kept(self, task: "asyncio.Task[Any]") -> None:
        """A stream's keeper ended: by stop(), by a loss for good, or by our bug, which
        must not leave the client waiting for a stream that never comes back."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("keeping the tunnel up failed", exc_info=task.exception())
        if not self.lost.done():
            self.lost.set_result(f"internal error: {task.exception()!r:.200}")

    # -- what the capture side asks --------------------------------------------------------

    @property
    def links(self) -> List[Link]:
        """Every stream's links, with its extra sessions' that are up."""
        return [link for index in range(len(self.tunnels)) for link in self._links(index)]

    @property
    def up(self) -> int:
        """How many streams are up."""
        return sum(1 for tunnel in self.tunnels if tunnel.up)

    @property
    def agent_python(self) -> str:
        return self.tunnels[0].agent_python

    @property
    def agent_capabilities(self) -> Tuple[str, ...]:
        """What every agent can do (they are the same program, so normally all of it)."""
        first, *others = self.tunnels
        return tuple(
            c for c in first.agent_capabilities if all(c in t.agent_capabilities for t in others)
        )

    def pick(self) -> Optional[Link]:
        """The link for a new channel, None while no stream is up: one that is not busy with
        a bulk transfer if there is one (agent_sessions' quiet lane), of those the one with
        the fewest open channels, taking turns between equals so that a burst spreads."""
        links = [
            link
            for index, tunnel in enumerate(self.tunnels)
            if tunnel.up
            for link in self._links(index)
        ]
        if not links:
            return None
        busy = {link for sessions in self.sessions.values() for link in sessions.busy}
        start = next(self._turn) % len(links)
        rotated = links[start:] + links[:start]
        return min(
            rotated, key=lambda link: (link in busy, len(link.mux.channels) + len(link.flows))
        )

    def index(self, link: Link) -> int:
        """The stream a link belongs to (0 for one no longer in use)."""
        for index in range(len(self.tunnels)):
            if link in self._links(index):
                return index
        return 0

    def hold(self, waiting: Waiting) -> bool:
        """Keep a connection until a stream is up; False if too many wait already."""
        if self._stopping or len(self._waiting) >= MAX_WAITING:
            return False
        self._waiting.add(waiting)
        return True

    def release(self, waiting: Waiting) -> None:
        """A held connection is done waiting (attached, or given up)."""
        self._waiting.discard(waiting)

    def _release_waiting(self) -> None:
        for waiting in list(self._waiting):
            link = self.pick()
            if link is None:
                return
            waiting.attach(link)

    # -- the TCP fast path ------------------------------------------------------------------

    @property
    def tcp_path(self) -> str:
        """Which path TCP takes: ssh (every stream's master), agent (none), or mixed."""
        fast = [tunnel.master is not None for tunnel in self.tunnels]
        return "ssh" if all(fast) else "mixed" if any(fast) else "agent"

    def _pick_master(self) -> Optional[Master]:
        # Not only once the agent greeted: a master is up a python start before that.
        masters = [
            tunnel.master
            for tunnel in self.tunnels
            if not tunnel.link.closed.done() and tunnel.master is not None and tunnel.master.room
        ]
        if not masters:
            return None
        start = next(self._turn) % len(masters)
        rotated = masters[start:] + masters[:start]
        return min(rotated, key=lambda master: len(master.forwards) + master.handing)

    def take(self, conn: socket.socket, destination: Destination, answer: bytes = b"") -> bool:
        """Hand a just-accepted connection to a master with room (the fast path); False
        leaves it to the agent's path: no master up (it waits there, as before), all full,
        or a connection that path turns away (NotCaptured: not redirected, to this host's
        own address, or outside what the session captures). answer: sent to the program
        first, before the hand-over (a proxy's "succeeded")."""
        master = None if self._stopping else self._pick_master()
        if master is None:
            return False
        try:
            host, port = destination(conn)
            source = endpoint(conn.getpeername())
        except (OSError, NotCaptured):
            return False
        wait = self.options.wait_tunnel
        master.claim()

        def refused(why: str) -> None:
            if self._stopping:
                reset(conn)
                return
            log.debug("ssh did not open %s (%s): through the agent", endpoint((host, port)), why)
            self._spawn(self._through_agent(conn, lambda: relay_for(self, destination, wait)))

        # Now, where a mux connection is ready (its answer comes to a callback); after the
        # answer, if there is one: ssh may write the target's first bytes to conn at once.
        if answer or not master.hand_over(conn, host, port, source, refused):
            self._spawn(self._hand_over(master, conn, (host, port, source), refused, answer))
        return True

    async def _hand_over(
        self,
        master: Master,
        conn: socket.socket,
        where: Tuple[str, int, str],
        refused: Callable[[str], None],
        answer: bytes = b"",
    ) -> None:
        """Through master, claimed, where no mux connection was ready or an answer goes
        first; refused(why) if it does not open."""
        host, port, source = where
        loop = asyncio.get_running_loop()
        try:
            try:
                if answer:
                    await loop.sock_sendall(conn, answer)
            except OSError as exc:  # the program left before its answer
                master.release()
                log.debug("%s: not answered: %s", source, exc.strerror or exc)
                reset(conn)
                return
            except BaseException:
                master.release()
                raise
            why = await master.open(conn, host, port, source, claimed=True)
        except BaseException:
            reset(conn)
            raise
        if why is not None:
            refused(why)

    async def _through_agent(
        self, conn: socket.socket, agent_path: Callable[[], asyncio.Protocol]
    ) -> None:
        """A connection the master did not open: the agent's answer decides (a refused
        connect is reset there, as always)."""
        try:
            await asyncio.get_running_loop().connect_accepted_socket(agent_path, sock=conn)
        except BaseException:
            reset(conn)
            raise

    def _forward_opened(self, forward: Forward) -> None:
        event = (forward.channel, forward.stream, "tcp-ssh", forward.source)
        self.publish(ChannelOpened(*event, forward.host, forward.port))
        master = self.tunnels[forward.stream].master
        if self.shortcuts is not None and master is not None:
            self.shortcuts.opened(master, forward.host, forward.port)

    def _master_gone(self, master: Master) -> None:
        if self.shortcuts is not None:
            self.shortcuts.master_gone(master)

    def _forward_closed(self, forward: Forward, up: int, down: int) -> None:
        self.closed_bytes[0] += up
        self.closed_bytes[1] += down
        self.publish(ChannelClosed(forward.channel, forward.stream, up, down))

    def on_channel_opened(self, relay: Incoming) -> None:
        self.publish(
            ChannelOpened(relay.channel, relay.stream, "tcp", relay.source, relay.host, relay.port)
        )

    def on_channel_closed(self, relay: Incoming) -> None:
        self.closed_bytes[0] += relay.bytes_out
        self.closed_bytes[1] += relay.bytes_in
        self.publish(ChannelClosed(relay.channel, relay.stream, relay.bytes_out, relay.bytes_in))

    # -- what the control socket asks ------------------------------------------------------

    def connections(self) -> List[Connection]:
        """Every open connection and flow: (channel, stream, proto, source, host, port,
        bytes up, bytes down, seconds open), oldest first."""
        now = time.monotonic()
        found: List[Connection] = [
            forward.describe(now)
            for tunnel in self.tunnels
            if tunnel.master is not None
            for forward in tunnel.master.forwards.values()
        ]
        for index, link in [(i, link) for i in range(len(self.tunnels)) for link in self._links(i)]:
            # The Link is the agent's too: its dicts name the agent's base classes.
            for item in (*link.channels.values(), *link.flows.values()):
                if isinstance(item, Listed):
                    found.append(item.describe(now, index))
        found.sort(key=lambda item: -item[8])
        return found

    def totals(self) -> Tuple[int, int, int, int]:
        """(channels, flows, bytes up, bytes down): open TCP channels and UDP flows, and the
        bytes of every TCP channel so far."""
        channels = flows = 0
        up, down = self.closed_bytes
        for tunnel in self.tunnels:
            if tunnel.master is not None:
                channels += len(tunnel.master.forwards)
                fast_up, fast_down = tunnel.master.totals()
                up += fast_up
                down += fast_down
        for link in self.links:
            channels += len(link.channels)
            flows += len(link.flows)
            for relay in link.channels.values():
                up += relay.bytes_out
                down += relay.bytes_in
        return channels, flows, up, down

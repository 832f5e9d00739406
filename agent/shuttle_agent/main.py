"""The agent's entry point: greet the client, then open the connections and flows it asks for,
and answer its questions about the server's routes, nameservers and host names."""

import asyncio
import logging
import os
import signal
import sys
from typing import Any, Coroutine, Optional, Set

from shuttle_ends.limits import raise_open_files
from shuttle_ends.relay import Link, Relay, WriterProtocol, refusal, widen_pipe
from shuttle_ends.resolv import read_nameservers
from shuttle_protocol import PROTOCOL_VERSION
from shuttle_protocol.mux import AGENT, MAX_WINDOW, Mux
from shuttle_protocol.schema import Message
from shuttle_protocol.stream_messages import (
    Error,
    GetHosts,
    GetNameservers,
    GetRoutes,
    Hello,
    Nameservers,
    Open,
    Opened,
    Pace,
    ProbeListen,
    Refused,
    UdpOpen,
)
from shuttle_protocol.stream_session import StreamSession

from .hosts import HostFinder
from .probe import listen_once
from .routes import read_routes, routes_answer
from .udp import IDLE_TIMEOUT, MAX_FLOWS, UdpOpener, settings_from_env

log = logging.getLogger("shuttle")

CAPABILITIES = ("tcp", "udp", "probe")
# Longer than the kernel's own SYN retries would be pointless; shorter would cut slow links.
CONNECT_TIMEOUT = 60.0
EXIT_PROTOCOL = 3


class Agent:
    """The agent's session: the handshake (stream_session's table), then Open → connect →
    Opened/Refused cycles, UdpOpen → a UDP flow (or Refused), and GetRoutes, GetNameservers
    and GetHosts answered."""

    def __init__(self, udp_idle: float = IDLE_TIMEOUT, udp_max_flows: int = MAX_FLOWS) -> None:
        self.link = Link(Mux(AGENT, max_window=MAX_WINDOW), self.on_message, "client")
        self.udp = UdpOpener(self.link, udp_idle, udp_max_flows)
        self.hosts = HostFinder(self.link.send)
        self.link.closed.add_done_callback(lambda _: self.hosts.close())
        self.session = StreamSession(AGENT, CAPABILITIES)
        self.error: Optional[str] = None
        # Strong references: the event loop keeps only weak ones to running tasks.
        self._tasks: Set[asyncio.Task[None]] = set()

    def on_message(self, msg: Message) -> None:
        if not self.link.admit(self.session, msg):
            return
        if isinstance(msg, Error):
            self.error = msg.text
            self.link.finish(f"client: {msg.text}")
        elif isinstance(msg, Open):
            # Registered now, so Data that follows in the same read is held, not dropped.
            relay = Relay(self.link, msg.channel)
            self.link.channels[msg.channel] = relay
            self._tasks.add(asyncio.get_running_loop().create_task(self.connect(msg, relay)))
        elif isinstance(msg, UdpOpen):
            self.udp.open(msg)
        elif isinstance(msg, GetRoutes):
            # Read at once: /proc files are in memory, and read_routes stops at its cap.
            for answer in routes_answer(read_routes()):
                self.link.send(answer)
        elif isinstance(msg, GetNameservers):
            self.link.send(Nameservers(tuple(read_nameservers())))
        elif isinstance(msg, GetHosts):
            self.hosts.request(msg.seeds)
        elif isinstance(msg, ProbeListen):
            self._spawn(listen_once(self.link))
        elif isinstance(msg, Pace):
            self.link.in_flight.set_floor(msg.floor_us / 1_000_000)
        # Welcome and Pong: the session has checked them, there is nothing more to do.

    def _spawn(self, coro: "Coroutine[Any, Any, None]") -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def connect(self, msg: Open, relay: Relay) -> None:
        try:
            await self._connect(msg, relay)
        finally:
            self._tasks.discard(asyncio.current_task())

    async def _connect(self, msg: Open, relay: Relay) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: relay, msg.host, msg.port), CONNECT_TIMEOUT
            )
        # ValueError: a host that cannot be encoded for the resolver (UnicodeError).
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            code, reason = refusal(exc)
            log.debug("channel %d: %s:%d refused: %s", msg.channel, msg.host, msg.port, reason)
            if self.link.channels.get(msg.channel) is relay:
                del self.link.channels[msg.channel]
            if msg.channel in self.link.mux.channels:
                self.link.mux.forget(msg.channel)
                self.link.send(Refused(msg.channel, code, reason))
            return
        if msg.channel in self.link.mux.channels:
            self.link.send(Opened(msg.channel))


async def serve() -> int:
    """Run the agent on fds 0 and 1 until the client goes away."""
    loop = asyncio.get_running_loop()
    agent = Agent(*settings_from_env(os.environ))
    log.debug("open-file limit %d", raise_open_files())
    for fd in (0, 1):
        widen_pipe(fd)
    writer, _ = await loop.connect_write_pipe(
        lambda: WriterProtocol(agent.link), os.fdopen(1, "wb", buffering=0)
    )
    agent.link.attach_writer(writer)
    python = ".".join(str(n) for n in sys.version_info[:3])
    agent.link.send(Hello(PROTOCOL_VERSION, CAPABILITIES, python))
    await loop.connect_read_pipe(lambda: agent.link, os.fdopen(0, "rb", buffering=0))
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, agent.link.finish, "signal")
    reason = await agent.link.closed
    log.debug("session over: %s", reason)
    if agent.link.datagrams_dropped:
        log.debug("%d datagrams dropped on a full pipe", agent.link.datagrams_dropped)
    return EXIT_PROTOCOL if agent.error or agent.link.failed else 0


def main() -> None:
    """Console script and upload entry point."""
    logging.basicConfig(
        format="shuttle-agent: %(message)s",
        level=logging.DEBUG if os.environ.get("SHUTTLE_AGENT_DEBUG") else logging.INFO,
    )
    try:
        sys.exit(asyncio.run(serve()))
    except KeyboardInterrupt:
        sys.exit(0)

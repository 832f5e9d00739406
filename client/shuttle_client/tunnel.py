"""The ssh side: start ssh, upload the agent, check its greeting, keep the Link running.

A start's steps overlap where they can: ssh's ControlMaster is up once ssh has authenticated,
before the server has even started the agent's python, so the client connects to it then
(`connected`: ssh's own TCP connection is up, and captured TCP may go through the master),
while the agent is still starting.
"""

import asyncio
import itertools
import logging
import os
import subprocess
from typing import Any, List, Optional, Sequence, Tuple

from shuttle_ends.relay import Link, WriterProtocol, widen_pipe
from shuttle_protocol.mux import CLIENT, MAX_WINDOW, Mux
from shuttle_protocol.schema import Message
from shuttle_protocol.stream_messages import (
    Error,
    Hello,
    Opened,
    Ping,
    Pong,
    ProbeListen,
    ProbeListening,
    Refused,
)
from shuttle_protocol.stream_session import StreamSession

from .cli import Options
from .discovery import Discovery
from .fastpath import Master, MuxError, master_options, probe
from .logs import printable, stage
from .proxy import Incoming
from .upload import build_payload, remote_command, ssh_argv

log = logging.getLogger("shuttle")

CAPABILITIES = ("tcp",)
# ssh may ask for a password or a host key confirmation on the terminal first.
GREETING_TIMEOUT = 120.0
EXIT_NOT_FOUND = 127  # the server's shell: command not found
# A tunnel is dead when this many keepalive intervals pass without the Pong to a Ping: a
# Pong may wait behind a window of bulk data on a slow link, so one interval is too short.
PONG_WAIT = 3
# How often to look for the master's socket while ssh authenticates: ssh makes it (under a
# temporary name, renamed once it listens) with nothing to tell us, before the session opens.
MASTER_POLL = 0.005
MAX_LINE = 4096  # of ssh's stderr, before it is logged without its end


class LineLogger(asyncio.Protocol):
    """A pipe's lines (ssh's stderr), each logged as it comes, made safe for a terminal."""

    def __init__(self) -> None:
        self._partial = b""
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > MAX_LINE:  # no newline in sight: a line of its own
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._log(line)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._partial:
            self._log(self._partial)
        if not self.ended.done():
            self.ended.set_result(None)

    @staticmethod
    def _log(line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text:
            log.info("%s", printable(text))


class TunnelError(Exception):
    """The tunnel could not start or broke; the text is for the user."""


class Tunnel:
    """One ssh process running the agent, and the multiplexed Link over its pipes."""

    def __init__(
        self,
        options: Options,
        name: str = "agent",
        ssh_options: Sequence[str] = (),
        master: Optional[Master] = None,
        control: Optional[str] = None,
    ) -> None:
        """ssh_options: added to the user's ssh command (when reconnecting). master: make
        ssh a ControlMaster there and, if the server forwards TCP, keep it (the fast path).
        control: without a master, make ssh a ControlMaster there all the same (for more
        agent sessions, agent_sessions.py)."""
        self.options = options
        self.ssh_options = tuple(ssh_options)
        self.master = master
        # Where ssh is a ControlMaster ("" if it is not asked to be).
        self.control_path = master.path if master else control or ""
        # Why TCP does not go through the master ("" while it does).
        self.fast_path_off = "" if master else "--tcp=agent"
        self._probe_port: Optional[asyncio.Future[int]] = None
        self._master_up: Optional[asyncio.Task[None]] = None
        self.link = Link(Mux(CLIENT, max_window=MAX_WINDOW), self._on_message, name)
        self.discovery = Discovery(self.link)
        self.agent_python = ""
        self.agent_capabilities: Tuple[str, ...] = ()
        self.session = StreamSession(CLIENT, CAPABILITIES)
        self._process: Optional[subprocess.Popen[bytes]] = None
        loop = asyncio.get_running_loop()
        self._greeted: asyncio.Future[None] = loop.create_future()
        # Done once ssh's connection is up: the master answered, or the agent greeted.
        self.connected: asyncio.Future[None] = loop.create_future()
        self._stderr = LineLogger()
        self._cookies = itertools.count(1)
        self._pong: Optional[Tuple[int, asyncio.Future[None]]] = None  # (cookie, its answer)

    @property
    def up(self) -> bool:
        """Whether the agent greeted us and the session still runs."""
        return self.session.greeted and not self.link.closed.done()

    async def start(self) -> None:
        """Start ssh and wait for the agent's greeting; TunnelError if that fails."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        options = self.options
        control = master_options(self.control_path) if self.control_path else ()
        argv = ssh_argv(
            (*options.ssh_cmd, *self.ssh_options, *control),
            options.ssh_destination,
            options.ssh_port,
            remote_command(options.python, options.verbose),
        )
        log.debug("running %s", " ".join(argv))
        to_ssh_read, to_ssh_write = os.pipe()
        from_ssh_read, from_ssh_write = os.pipe()
        # ssh's stderr (its own messages, and the agent's) comes to our log: a daemon has no
        # terminal for it, and the lines must come before ours that refer to them.
        err_read, err_write = os.pipe()
        try:
            self._process = subprocess.Popen(
                argv, stdin=to_ssh_read, stdout=from_ssh_write, stderr=err_write
            )
        except OSError as exc:
            for fd in (to_ssh_read, to_ssh_write, from_ssh_read, from_ssh_write, err_read):
                os.close(fd)
            os.close(err_write)
            raise TunnelError(f"cannot run {argv[0]}: {exc.strerror}") from None
        stage(f"{self.link.peer}: ssh started")
        for fd in (to_ssh_read, from_ssh_write, err_write):
            os.close(fd)
        if self.master is not None:
            self._master_up = asyncio.ensure_future(self._connect_master(self.master))
        await self._run_agent(to_ssh_write, from_ssh_read, err_read)

    async def _run_agent(self, to_ssh_write: int, from_ssh_read: int, err_read: int) -> None:
        """Upload the agent on ssh's stdin, run the Link over the pipes, wait for the
        greeting; TunnelError if it does not come."""
        for fd in (to_ssh_write, from_ssh_read):
            widen_pipe(fd)
        loop = asyncio.get_running_loop()
        writer, _ = await loop.connect_write_pipe(
            lambda: WriterProtocol(self.link), os.fdopen(to_ssh_write, "wb", buffering=0)
        )
        self.link.attach_writer(writer)
        writer.write(build_payload())
        await loop.connect_read_pipe(lambda: self.link, os.fdopen(from_ssh_read, "rb", buffering=0))
        await loop.connect_read_pipe(lambda: self._stderr, os.fdopen(err_read, "rb", buffering=0))
        waiting: List[asyncio.Future[Any]] = [self._greeted, self.link.closed]
        done, _ = await asyncio.wait(
            waiting,
            timeout=GREETING_TIMEOUT,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if self._greeted in done and self._greeted.exception() is None:
            stage(f"{self.link.peer}: the agent's Hello")
            self._set_connected()
            if self.master is not None:  # not an extra session's (agent_sessions.py)
                await self._start_master()
                stage(f"{self.link.peer}: the probe done")
            return
        if self._greeted.done() and self._greeted.exception() is not None:
            raise self._greeted.exception()  # type: ignore[misc]
        if not done:
            raise TunnelError(f"the agent did not greet within {GREETING_TIMEOUT:.0f} s")
        raise TunnelError(await self._why_it_ended())

    async def _start_master(self) -> None:
        """Find out whether ssh is a ControlMaster and sshd forwards TCP for us: if both,
        TCP goes through the master; if not, through the agent (--tcp=ssh: an error)."""
        master = self.master
        if master is None:
            return
        why = await self._probe(master)
        if why is None:
            log.debug("%s: TCP goes through ssh's own forwarding", self.link.peer)
            return
        self.master, self.fast_path_off = None, why
        await self._master_given_up()
        master.close()
        if self.options.tcp == "ssh":
            raise TunnelError(f"--tcp=ssh, but {why}")
        log.info("TCP goes through the agent: %s", why)

    async def _connect_master(self, master: Master) -> None:
        """Connect to the master as soon as ssh has made its socket, or once the agent has
        greeted (ssh makes it before it opens the agent's session, so then it is there or
        never will be: a user's ControlMaster=no, an ssh that is not OpenSSH); MuxError if
        that fails. Bounded: the greeting has a timeout, and so has this."""
        for _ in range(int(GREETING_TIMEOUT / MASTER_POLL)):
            if self._greeted.done() or self.link.closed.done() or os.path.exists(master.path):
                break
            await asyncio.sleep(MASTER_POLL)
        await master.start(self._process.pid if self._process is not None else 0)
        stage(f"{self.link.peer}: the master's Hello")
        self._set_connected()

    async def _master_given_up(self) -> None:
        """Stop connecting to the master, and take its outcome (a MuxError is why, and was
        said already where it mattered: no task may end with its exception unread)."""
        if self._master_up is not None:
            self._master_up.cancel()
            await asyncio.gather(self._master_up, return_exceptions=True)

    def _set_connected(self) -> None:
        if not self.connected.done():
            self.connected.set_result(None)

    async def _probe(self, master: Master) -> Optional[str]:
        if "probe" not in self.agent_capabilities:
            return "the agent cannot probe (an older shuttle-agent)"
        master_up = self._master_up  # started with ssh, for every master
        if master_up is None:
            return "ssh was not started as a ControlMaster"
        # The agent's listener while the master is connected to: round trips in parallel.
        self._probe_port = asyncio.get_running_loop().create_future()
        self.link.send(ProbeListen())
        try:
            await master_up
        except MuxError as exc:
            return f"ssh is not a ControlMaster ({exc})"
        waiting: List[asyncio.Future[Any]] = [self._probe_port, self.link.closed]
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if self._probe_port not in done:
            return "the session ended during the probe"
        why = await probe(master, self._probe_port.result())
        if why is None:
            return None
        return f"the server does not forward TCP for this user (ssh: {printable(why)})"

    def _on_probe_listening(self, msg: ProbeListening) -> None:
        if self._probe_port is None or self._probe_port.done():
            self.link.fail("ProbeListening without ProbeListen")
        else:
            self._probe_port.set_result(msg.port)

    async def _why_it_ended(self) -> str:
        status = await self.wait_exit(5.0)
        # ssh's last words first: the text below may point at them.
        await asyncio.wait([self._stderr.ended], timeout=2.0)
        python = self.options.python or "python3 or python"
        if status == EXIT_NOT_FOUND:
            return f"{python} was not found on the server (choose another with --python)"
        if status == 255:  # ssh's own failure; it said why on stderr
            return "ssh could not connect (see ssh's message above)"
        return f"the agent did not start (ssh exited with status {status})"

    async def wait_exit(self, timeout: float) -> Optional[int]:
        """ssh's exit status, waiting up to timeout seconds; None if it is still running."""
        process = self._process
        if process is None:
            return None
        for _ in range(int(timeout * 20)):
            status = process.poll()
            if status is not None:
                return status
            await asyncio.sleep(0.05)
        return process.poll()

    async def stop(self) -> None:
        """End ssh: close its stdin (the agent exits), then terminate it if it lingers.
        The forwards it carried are reset: the program must not take a cut for an end."""
        self.link.finish("stopping")
        await self._master_given_up()
        if self.master is not None:
            self.master.close()
        if self._process is None:
            return
        if await self.wait_exit(2.0) is None:
            self._process.terminate()
            if await self.wait_exit(2.0) is None:
                self._process.kill()
                await self.wait_exit(2.0)

    async def keepalive(self, interval: float) -> None:
        """Ping the agent every interval seconds until the session ends; end it when a Pong
        is PONG_WAIT intervals late. ssh alone may take many minutes to notice a dead
        network (TCP retries), or never notice an agent that is stopped."""
        loop = asyncio.get_running_loop()
        while not self.link.closed.done():
            await asyncio.sleep(interval)
            answered: asyncio.Future[None] = loop.create_future()
            cookie = next(self._cookies)
            self._pong = (cookie, answered)
            self.link.send(Ping(cookie))
            waiting: List[asyncio.Future[Any]] = [answered, self.link.closed]
            done, _ = await asyncio.wait(
                waiting, timeout=interval * PONG_WAIT, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                self.link.finish(f"the agent did not answer a ping in {interval * PONG_WAIT:g} s")
                self._kill()

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    def _on_pong(self, msg: Pong) -> None:
        if self._pong is not None and self._pong[0] == msg.cookie:
            self._pong[1].set_result(None)
            self._pong = None

    def _on_message(self, msg: Message) -> None:
        if not self.link.admit(self.session, msg):
            if isinstance(msg, Hello) and not self._greeted.done():
                # Refused before any greeting: another protocol version. The user sees why.
                self._greeted.set_exception(TunnelError(str(self.link.failed)))
            return
        if isinstance(msg, Hello):
            self.agent_python = msg.python
            self.agent_capabilities = msg.capabilities
            self._greeted.set_result(None)
        elif isinstance(msg, Error):
            text = f"the agent reported: {printable(msg.text)}"
            if not self._greeted.done():
                self._greeted.set_exception(TunnelError(text))
            self.link.finish(text)
        elif isinstance(msg, Refused):
            self._on_refused(msg)
        elif isinstance(msg, Pong):
            self._on_pong(msg)
        elif isinstance(msg, ProbeListening):
            self._on_probe_listening(msg)
        elif isinstance(msg, Opened):
            relay = self.link.channels.get(msg.channel)
            if isinstance(relay, Incoming):
                relay.on_opened()
        else:
            # The table lets through only what this dispatch or discovery handles.
            self.discovery.on_message(msg)

    def _on_refused(self, msg: Refused) -> None:
        reason = printable(msg.reason)
        log.debug("channel %d refused by the remote side: %s", msg.channel, reason)
        relay = self.link.channels.get(msg.channel)
        if isinstance(relay, Incoming):
            relay.on_refused(msg.errno)
        elif relay is not None:
            relay.reset()
        flow = self.link.flows.pop(msg.channel, None)
        if flow is not None:
            flow.reset()

"""Shortcuts: a destination that many connections go to gets a local forward of the master's
own, as ssh -L's, and firewalld sends the owner's new connections to it there
(SetShortcutsRequest), so that ssh accepts them itself and neither this process nor the
master's mux code sees them. A hand-over costs a turn of the client's loop and mux.c's work
per connection, which held the sequential connect rate at 0.7x ssh -L's where the redirect
into ssh's own listener reached 0.945x (docs/performance.md, "the shortcut").

What that changes for such a connection, and why it stays narrow:
- at most MAX_ACTIVE destinations, each with at most `limit` connections open at once (the
  --tcp-cap, as the kernel counts them: the rule's ct count): past that, new ones come to
  the client as before;
- the client keeps a copy of ssh's listener: its SO_LINGER 0, which accepted sockets
  inherit, makes a dying ssh reset them (never a clean EOF), and while the rule points at
  the port, the port stays ours (no other user can bind it once ssh lets it go);
- while the master is down a connection to a shortcut waits in that copy's backlog, and is
  reset once the shortcut is gone (the client removes it as soon as it sees the master go);
  new connections then wait for the next master as usual;
- ssh accepts before it asks the server, so a refused connect reaches the program as a
  closed connection: only destinations that HOT_AFTER forwards reached get a shortcut;
- `ctl connections` does not list their connections (they are ssh's); `ctl status` lists
  the shortcuts.
"""

import asyncio
import ctypes
import errno
import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, Dict, List, Optional, Set, Tuple

from shuttle_protocol.firewall_messages import MAX_SHORTCUT_LIMIT

from . import ssh_mux
from .fastpath import Master, cap_within_fd_limit
from .firewall_session import FirewallError, FirewallUnavailable
from .proxy import connection_cap
from .targets import endpoint

log = logging.getLogger("shuttle")

HOT_AFTER = 16  # forwards to one destination that opened before it gets a shortcut
# Shortcuts at once: each holds up to the limit of connections in ssh, one descriptor
# each, beside the hand-overs' three a forward under the same open-file limit (fastpath.py).
MAX_ACTIVE = 4
MAX_REFUSED = 3  # shortcuts firewalld refused before the client stops asking for more
MAX_COUNTED = 1024  # destinations counted at once; past it, the counts start again
PORT_TRIES = 3  # free loopback ports tried for one forward (another process may take one)
LOOPBACK = {4: "127.0.0.1", 6: "::1"}
FAMILIES = (socket.AF_INET, socket.AF_INET6)
LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger: on, 0 s: close() sends a reset
SYS_PIDFD_GETFD = 438  # Linux 5.6; 438 in the generic table (x86-64, arm64, riscv, ...)
_LIBC = ctypes.CDLL(None, use_errno=True)

# (address, port, local port), as SetShortcutsRequest takes them.
Entry = Tuple[str, int, int]
Apply = Callable[[Tuple[Entry, ...]], Awaitable[object]]


@dataclass(frozen=True, eq=False)
class Shortcut:
    """One destination that goes straight to a master's own forward on local_port; the
    client holds a copy of ssh's listener (listener), so that the port stays ours, bound,
    until the rule that sends connections there is gone, whatever ssh does meanwhile."""

    host: str
    port: int
    local_port: int
    master: Master
    listener: socket.socket

    @property
    def entry(self) -> Entry:
        return (self.host, self.port, self.local_port)

    def describe(self) -> str:
        listen = endpoint((LOOPBACK[_version(self.host)], self.local_port))
        return f"{endpoint((self.host, self.port))} through ssh's own forward at {listen}"


class Shortcuts:
    """The client's shortcuts: which destinations are hot, the forwards made for them, and
    firewalld's rules kept to match (apply: sends the whole list, FirewallError if refused).

    A shortcut is retired in an order that never leaves ssh's forward open without the
    rules' guard, nor the port free while a rule points at it: ssh's forward closes first
    (the client's copy of the listener keeps the port, and connections wait in its backlog),
    then the rules go, then the copy, which resets the connections that waited."""

    def __init__(self, apply: Apply, captures: Callable[[Tuple[str, int]], bool]) -> None:
        self.enabled = True  # new shortcuts may be made
        self._stopping = False  # stop(): the rules stay until the firewall session closes
        self.active: List[Shortcut] = []
        self._apply = apply
        self._captures = captures
        self._counts: Dict[Tuple[str, int], int] = {}
        self._making: Set[Tuple[str, int]] = set()
        self._given_up: Set[Tuple[str, int]] = set()
        self._refused = 0
        self._lock = asyncio.Lock()  # one request to firewalld at a time, in order
        self._tasks: Set[asyncio.Task[object]] = set()

    def opened(self, master: Master, host: str, port: int) -> None:
        """A forward to host:port opened through master: count it, and past HOT_AFTER give
        the destination a shortcut on that master."""
        if not self.enabled:
            return
        key = (host, port)
        if key in self._making or key in self._given_up or self._has(key):
            return
        if not _is_address(host) or not self._captures(key):
            return  # a name or a destination only a proxy reached: no rule can match it
        if len(self._counts) >= MAX_COUNTED and key not in self._counts:
            self._counts.clear()
        count = self._counts[key] = self._counts.get(key, 0) + 1
        if count < HOT_AFTER or len(self.active) + len(self._making) >= MAX_ACTIVE:
            return
        del self._counts[key]
        self._making.add(key)
        self._spawn(self._make(master, host, port))

    def master_gone(self, master: Master) -> None:
        """master's forwards went with it: its shortcuts go from the rules now."""
        self._retire_where(lambda shortcut: shortcut.master is master)

    async def drop_uncaptured(self, captures: Callable[[Tuple[str, int]], bool]) -> None:
        """Before the session's routes change to ones that capture as captures says: retire
        the shortcuts they would not capture (firewalld would drop their rules, and guards,
        while ssh's forwards still listened)."""
        dropped = self._take(lambda shortcut: not captures((shortcut.host, shortcut.port)))
        if dropped:
            await self._retire(dropped, self._sync)

    def firewall_lost(self) -> None:
        """firewalld lost the session, and every rule with it, guards included: close every
        forward now (anyone on this machine could use them). Hot destinations are counted
        afresh on the new session."""
        dropped, self.active = self.active, []
        self._counts.clear()
        self._spawn(self._retire(dropped))

    @property
    def entries(self) -> Tuple[Entry, ...]:
        return tuple(shortcut.entry for shortcut in self.active)

    async def stop(self) -> None:
        """No more changes: the client stops, and closing the firewall session removes the
        rules (close() then lets the listeners' copies go)."""
        self.enabled = False
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        """The copies of ssh's listeners, once the rules are gone."""
        for shortcut in self.active:
            shortcut.listener.close()
        self.active = []

    def _has(self, key: Tuple[str, int]) -> bool:
        return any((shortcut.host, shortcut.port) == key for shortcut in self.active)

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _retire_where(self, match: Callable[[Shortcut], bool]) -> None:
        if self._stopping:
            return
        dropped = self._take(match)
        if dropped:
            self._spawn(self._retire(dropped, self._sync))

    def _take(self, match: Callable[[Shortcut], bool]) -> List[Shortcut]:
        """The active shortcuts that match, no longer active."""
        taken = [shortcut for shortcut in self.active if match(shortcut)]
        self.active = [shortcut for shortcut in self.active if shortcut not in taken]
        return taken

    async def _make(self, master: Master, host: str, port: int) -> None:
        key = (host, port)
        try:
            shortcut = await _forward(master, host, port)
            if shortcut is None:
                self._give_up(key)
            elif master.closed or not self.enabled or not self._captures(key):
                await self._retire([shortcut])  # it went, or it changed meanwhile
            else:
                self.active.append(shortcut)
                if await self._sync(shortcut) and shortcut in self.active:
                    log.info("connections to %s go straight to ssh", shortcut.describe())
        finally:
            self._making.discard(key)

    def _give_up(self, key: Tuple[str, int]) -> None:
        if len(self._given_up) >= MAX_COUNTED:
            self._given_up.clear()
        self._given_up.add(key)

    async def _retire(
        self, dropped: List[Shortcut], rules: Optional[Callable[[], Awaitable[object]]] = None
    ) -> None:
        """ssh's forwards first, then the rules without them (rules: how, where any of
        theirs are in force), then the copies."""
        for shortcut in dropped:
            await _close(shortcut)
        if rules is not None:
            await rules()
        for shortcut in dropped:
            shortcut.listener.close()

    async def _sync(self, new: Optional[Shortcut] = None) -> bool:
        """Send firewalld the shortcuts as they are now. If it refuses, the new one is
        retired (with none, all of them); after MAX_REFUSED refusals no more are made (an
        older firewalld, say). A lost session (FirewallUnavailable) is firewall_lost()'s."""
        async with self._lock:
            try:
                await self._apply(self.entries)
            except FirewallError as exc:
                failed: Optional[FirewallError] = exc
            else:
                failed = None
        if failed is None:
            return True
        if not isinstance(failed, FirewallUnavailable):
            log.info("firewalld kept the shortcuts out: %s", failed)
            self._refused += 1
            if self._refused >= MAX_REFUSED:
                self.enabled = False
        if new is not None:
            self._take(lambda shortcut: shortcut is new)
            self._give_up((new.host, new.port))
            await self._retire([new])
        else:  # the rules stay as they were: none of them may point at a free port
            lost = isinstance(failed, FirewallUnavailable)
            await self._retire(self._take(lambda shortcut: True), None if lost else self._clear)
        return False

    async def _clear(self) -> None:
        """No shortcuts at all: firewalld would not take fewer, so none (which needs no
        listener) is asked for; if even that fails, they stay until the session closes."""
        try:
            async with self._lock:
                await self._apply(())
        except FirewallError as exc:
            log.warning("could not remove the shortcuts: %s", exc)


async def _forward(master: Master, host: str, port: int) -> Optional[Shortcut]:
    """A forward of master's to host:port on a free loopback port of host's IP version,
    its listener set to reset what it accepted when closed, and copied; None if not."""
    pid = master.child_pid
    if pid is None:
        return None  # not our ssh: its listener is not ours to reach
    listen_host = LOOPBACK[_version(host)]
    why = ""
    for _ in range(PORT_TRIES):
        local_port = _free_port(listen_host)
        if local_port is None:
            return None
        opening = ssh_mux.OpenLocalFwd(master.next_request(), listen_host, local_port, host, port)
        why = await master.local_forward(opening) or ""
        if why:
            continue
        listener = _listener_copy(pid, listen_host, local_port)
        if isinstance(listener, socket.socket):
            return Shortcut(host, port, local_port, master, listener)
        why = listener
        await _close_forward(master, listen_host, local_port, host, port)
        break
    log.info("no shortcut to %s: %s", endpoint((host, port)), why)
    return None


async def _close(shortcut: Shortcut) -> None:
    """Stop a shortcut's forward while its master lives."""
    if not shortcut.master.closed:
        listen_host = LOOPBACK[_version(shortcut.host)]
        await _close_forward(
            shortcut.master, listen_host, shortcut.local_port, shortcut.host, shortcut.port
        )


async def _close_forward(
    master: Master, listen_host: str, local_port: int, host: str, port: int
) -> None:
    closing = ssh_mux.CloseLocalFwd(master.next_request(), listen_host, local_port, host, port)
    why = await master.local_forward(closing)
    if why is not None:
        log.warning("ssh kept its forward at port %d: %s", local_port, why)


def _listener_copy(pid: int, host: str, port: int) -> "socket.socket | str":
    """A copy of ssh's listener on host:port, with SO_LINGER 0 set on it, which the
    connections it accepts inherit: when ssh dies, the kernel then resets them, and a
    program does not read a cut transfer as a whole one (ssh shuts down its write side
    before it closes after a remote EOF, so a normal end still reads every byte and then
    EOF). Else why not. The listener is found among ssh's descriptors and reached through
    pidfd_getfd, which needs ptrace rights over ssh: our child, of our uid."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        return f"pidfd_open: {exc.strerror or exc}"
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                found = _if_listener(pidfd, pid, int(name), port)
            except OSError as exc:
                # ssh closed it meanwhile (its mux connections come and go): not the listener.
                if exc.errno not in (errno.ENOENT, errno.EBADF):
                    raise
                continue
            if found is not None:
                found.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                return found
    except OSError as exc:
        return f"ssh's descriptors: {exc.strerror or exc}"
    finally:
        os.close(pidfd)
    return f"ssh has no listener on {endpoint((host, port))}"


def _if_listener(pidfd: int, pid: int, target: int, port: int) -> Optional[socket.socket]:
    """A copy of ssh's descriptor target if it is a TCP listener on port, else None."""
    if not os.readlink(f"/proc/{pid}/fd/{target}").startswith("socket:"):
        return None
    sock = socket.socket(fileno=_pidfd_getfd(pidfd, target))
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if listening and sock.family in FAMILIES and sock.getsockname()[1] == port:
            return sock
    except OSError:
        sock.close()
        raise
    sock.close()
    return None


def _pidfd_getfd(pidfd: int, target: int) -> int:
    """A copy of another process's descriptor (pidfd_getfd(2), which Python has no call
    for); OSError if the kernel refuses."""
    fd = _LIBC.syscall(SYS_PIDFD_GETFD, pidfd, target, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def shortcut_limit(cap: int) -> int:
    """Connections at once per shortcut: the --tcp-cap, within a quarter of the open-file
    room shared by MAX_ACTIVE shortcuts (ssh holds one descriptor for each of them, and the
    hand-overs' cap takes another quarter), within what firewalld takes; 0: no shortcuts."""
    return min(cap_within_fd_limit(cap), connection_cap() // 4 // MAX_ACTIVE, MAX_SHORTCUT_LIMIT)


def _free_port(host: str) -> Optional[int]:
    """A loopback port free right now (ssh binds it next; if another process is quicker,
    the forward fails and another port is tried)."""
    family = socket.AF_INET6 if _version(host) == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            return int(probe.getsockname()[1])
    except OSError as exc:
        log.debug("no free port on %s: %s", host, exc.strerror or exc)
        return None


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _version(host: str) -> int:
    return ipaddress.ip_address(host).version

"""Shortcuts: a destination that many connections go to gets a local forward of the master's
own, as ssh -L's, and firewalld sends the owner's new connections to it there
(SetShortcutsRequest), so that ssh accepts them itself and neither this process nor the
master's mux code sees them. A hand-over costs a turn of the client's loop and mux.c's work
per connection, which held the sequential connect rate at 0.7x ssh -L's where the redirect
into ssh's own listener reached 0.945x (docs/performance.md, "the shortcut").

What that changes for such a connection, and why it stays narrow:
- at most `limit` of them (the --tcp-cap) are open at once per destination, as the kernel
  counts them (the rule's ct count): past that, new ones come to the client as before;
- while the master is down its listeners are gone, so a connection to a shortcut is refused
  at once, not held for --wait-tunnel; the shortcuts are removed as soon as the master is
  seen to go, and new connections wait for the next one again (nothing leaves by another
  path either way);
- ssh accepts before it asks the server, so a refused connect reaches the program as a
  closed connection: only destinations that HOT_AFTER forwards reached get a shortcut;
- `ctl connections` lists a shortcut as one line (its open connections are ssh's).
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

from shuttle_protocol.firewall_messages import MAX_SHORTCUTS

from . import ssh_mux
from .fastpath import Master
from .firewall_session import FirewallError, FirewallUnavailable
from .targets import endpoint

log = logging.getLogger("shuttle")

HOT_AFTER = 16  # forwards to one destination that opened before it gets a shortcut
MAX_REFUSED = 3  # shortcuts firewalld refused before the client stops asking for more
MAX_COUNTED = 1024  # destinations counted at once; past it, the counts start again
PORT_TRIES = 3  # free loopback ports tried for one forward (another process may take one)
LOOPBACK = {4: "127.0.0.1", 6: "::1"}
SHORTCUT_METHODS = ("nft", "nat")  # tproxy's connections reach transparent sockets only
FAMILIES = (socket.AF_INET, socket.AF_INET6)
LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger: on, 0 s: close() sends a reset
SYS_PIDFD_GETFD = 438  # the same number on every architecture (added in Linux 5.6)
_LIBC = ctypes.CDLL(None, use_errno=True)

# (address, port, local port), as SetShortcutsRequest takes them.
Entry = Tuple[str, int, int]
Apply = Callable[[Tuple[Entry, ...]], Awaitable[object]]


@dataclass(frozen=True)
class Shortcut:
    """One destination that goes straight to a master's own forward on local_port."""

    host: str
    port: int
    local_port: int
    master: Master

    @property
    def entry(self) -> Entry:
        return (self.host, self.port, self.local_port)

    def describe(self) -> str:
        listen = endpoint((LOOPBACK[_version(self.host)], self.local_port))
        return f"{endpoint((self.host, self.port))} through ssh's own forward at {listen}"


class Shortcuts:
    """The client's shortcuts: which destinations are hot, the forwards made for them, and
    firewalld's rules kept to match (apply: sends the whole list, FirewallError if refused).
    Off until enable(): only the nft and nat methods redirect into a loopback port."""

    def __init__(self, apply: Apply, captures: Callable[[Tuple[str, int]], bool]) -> None:
        self.enabled = False
        self.active: List[Shortcut] = []
        self._apply = apply
        self._captures = captures
        self._counts: Dict[Tuple[str, int], int] = {}
        self._making: Set[Tuple[str, int]] = set()
        self._given_up: Set[Tuple[str, int]] = set()
        self._refused = 0
        self._lock = asyncio.Lock()  # one request to firewalld at a time, in order
        self._tasks: Set[asyncio.Task[object]] = set()

    def enable(self) -> None:
        self.enabled = True

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
        if count < HOT_AFTER or len(self.active) + len(self._making) >= MAX_SHORTCUTS:
            return
        del self._counts[key]
        self._making.add(key)
        self._spawn(self._make(master, host, port))

    def master_gone(self, master: Master) -> None:
        """master's listeners went with it: its shortcuts go from the rules now."""
        kept = [shortcut for shortcut in self.active if shortcut.master is not master]
        if len(kept) != len(self.active):
            self.active = kept
            self._spawn(self._sync())

    def routes_changed(self) -> None:
        """The session captures other routes: drop the shortcuts it no longer captures."""
        dropped = [s for s in self.active if not self._captures((s.host, s.port))]
        if dropped:
            self.active = [s for s in self.active if s not in dropped]
            self._spawn(self._drop(dropped))

    def firewall_back(self) -> None:
        """The firewall session was opened again, without shortcuts: set them again."""
        if self.active:
            self._spawn(self._sync())

    @property
    def entries(self) -> Tuple[Entry, ...]:
        return tuple(shortcut.entry for shortcut in self.active)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _has(self, key: Tuple[str, int]) -> bool:
        return any((shortcut.host, shortcut.port) == key for shortcut in self.active)

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _make(self, master: Master, host: str, port: int) -> None:
        try:
            local_port = await _forward(master, host, port)
            if local_port is None:
                self._given_up.add((host, port))
                return
            shortcut = Shortcut(host, port, local_port, master)
            if not self._captures((host, port)):  # the routes changed meanwhile
                await _close(shortcut)
                return
            if master.closed:
                return  # its listener went with it
            self.active.append(shortcut)
            if await self._sync(shortcut):
                log.info("connections to %s go straight to ssh", shortcut.describe())
            else:
                self._given_up.add((host, port))
        finally:
            self._making.discard((host, port))

    async def _drop(self, dropped: List[Shortcut]) -> None:
        """The rules without these first, then their forwards."""
        await self._sync()
        for shortcut in dropped:
            await _close(shortcut)

    async def _sync(self, new: Optional[Shortcut] = None) -> bool:
        """Send firewalld the shortcuts as they are now. If it refuses, the new one is
        dropped (or, with none, all of them: the session was opened again without any);
        after MAX_REFUSED refusals no more are made (an older firewalld, say)."""
        async with self._lock:
            try:
                await self._apply(self.entries)
            except FirewallUnavailable as exc:  # firewall_back() sets them on the new session
                log.debug("shortcuts wait for the firewall session: %s", exc)
                return False
            except FirewallError as exc:
                log.info("firewalld kept the shortcuts out: %s", exc)
                self._refused += 1
                if self._refused >= MAX_REFUSED:
                    self.enabled = False
                dropped = [new] if new is not None else self.active
                self.active = [s for s in self.active if s not in dropped]
                if new is None:
                    await self._clear()
                for shortcut in dropped:
                    await _close(shortcut)
                return False
            return True

    async def _clear(self) -> None:
        """No shortcuts at all: firewalld would not take fewer, so none (which needs no
        listener) is asked for; if even that fails, they stay until the session closes."""
        try:
            await self._apply(())
        except FirewallError as exc:
            log.warning("could not remove the shortcuts: %s", exc)


async def _forward(master: Master, host: str, port: int) -> Optional[int]:
    """A forward of master's to host:port on a free loopback port of host's IP version,
    its listener set to reset what it accepted when closed; that port, or None."""
    pid = master.child_pid
    if pid is None:
        return None  # not our ssh: its listener is not ours to set
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
        why = _reset_on_close(pid, listen_host, local_port) or ""
        if not why:
            return local_port
        await _close(Shortcut(host, port, local_port, master))
        break
    log.info("no shortcut to %s: %s", endpoint((host, port)), why)
    return None


async def _close(shortcut: Shortcut) -> None:
    """Stop a shortcut's forward while its master lives (the listener would otherwise
    stay, a way to the destination for anyone on this machine)."""
    master = shortcut.master
    if master.closed:
        return
    listen_host = LOOPBACK[_version(shortcut.host)]
    closing = ssh_mux.CloseLocalFwd(
        master.next_request(), listen_host, shortcut.local_port, shortcut.host, shortcut.port
    )
    why = await master.local_forward(closing)
    if why is not None:
        log.warning("ssh kept its forward at port %d: %s", shortcut.local_port, why)


def _reset_on_close(pid: int, host: str, port: int) -> Optional[str]:
    """Set SO_LINGER 0 on ssh's listener on host:port, which the connections it accepts
    inherit: when ssh dies, the kernel then resets them, and a program does not read a cut
    transfer as a whole one (ssh shuts down its write side before it closes after a remote
    EOF, so a normal end still reads every byte and then EOF). None once set, else why not.
    The listener is found among ssh's descriptors and reached through pidfd_getfd, which
    needs ptrace rights over ssh: our child, of our uid."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        return f"pidfd_open: {exc.strerror or exc}"
    try:
        names = os.listdir(f"/proc/{pid}/fd")
        for name in names:
            try:
                if _set_if_listener(pidfd, pid, int(name), port):
                    return None
            except OSError as exc:
                # ssh closed it meanwhile (its mux connections come and go): not the listener.
                if exc.errno not in (errno.ENOENT, errno.EBADF):
                    raise
    except OSError as exc:
        return f"ssh's descriptors: {exc.strerror or exc}"
    finally:
        os.close(pidfd)
    return f"ssh has no listener on {endpoint((host, port))}"


def _set_if_listener(pidfd: int, pid: int, target: int, port: int) -> bool:
    """Set SO_LINGER 0 on ssh's descriptor target if it is a TCP listener on port."""
    if not os.readlink(f"/proc/{pid}/fd/{target}").startswith("socket:"):
        return False
    with socket.socket(fileno=_pidfd_getfd(pidfd, target)) as sock:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if not (listening and sock.family in FAMILIES and sock.getsockname()[1] == port):
            return False
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        return True


def _pidfd_getfd(pidfd: int, target: int) -> int:
    """A copy of another process's descriptor (pidfd_getfd(2), which Python has no call
    for); OSError if the kernel refuses."""
    fd = _LIBC.syscall(SYS_PIDFD_GETFD, pidfd, target, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def _free_port(host: str) -> Optional[int]:
    """A loopback port free right now (ssh binds it next; if another process is quicker,
    the forward fails and another port is tried)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
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

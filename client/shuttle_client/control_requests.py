"""THE table of requests the client's control socket serves, and what each does to the
running client (`Running`). Anything not in the table is refused.
"""

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple, Type

from shuttle_protocol import control_messages as cm
from shuttle_protocol.firewall_messages import Target
from shuttle_protocol.schema import Message

from .cli import Options
from .control import RequestRefused
from .firewall_session import FirewallError, FirewallSession
from .hosts_sync import HostsSync
from .streams import Streams
from .targets import Scope, describe


@dataclass
class Running:
    """What the control socket sees of a running client, and may change."""

    options: Options
    streams: Streams
    firewall: FirewallSession
    stop: Callable[[str], None]
    started: float = field(default_factory=time.monotonic)
    ready: bool = False  # the first ready line is out
    stopping: bool = False
    method: str = ""
    subnets: Tuple[Target, ...] = ()
    excludes: Tuple[Target, ...] = ()  # the user's; the ssh server's are in fixed_excludes
    fixed_excludes: Tuple[Target, ...] = ()
    dns: Tuple[str, ...] = ()
    hosts: Optional[HostsSync] = None
    firewall_lost: bool = False  # firewalld lost the session; it is being opened again
    # One change of the routes at a time: each computes the next from the current ones.
    changing: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def state(self) -> str:
        if self.stopping:
            return "stopping"
        if not self.ready:
            return "starting"
        if self.firewall_lost:
            return "firewall-lost"
        return "up" if self.streams.up == len(self.streams.tunnels) else "reconnecting"

    # The Scope of the routes, and the routes it was made of (compared by identity: every
    # change of them is a new tuple, and comparing 10,000 targets is not free).
    _scope: Optional[Scope] = field(default=None, init=False, repr=False)
    _scope_of: Tuple[Tuple[Any, ...], ...] = field(default=(), init=False, repr=False)

    @property
    def all_excludes(self) -> Tuple[Target, ...]:
        return tuple(dict.fromkeys(self.excludes + self.fixed_excludes))

    def captures(self, destination: Tuple[str, int]) -> bool:
        """Whether the session captures connections to destination, as its routes are now."""
        routes = (self.subnets, self.excludes, self.fixed_excludes, self.dns)
        if self._scope is None or any(a is not b for a, b in zip(self._scope_of, routes)):
            self._scope = Scope(self.subnets, self.all_excludes, self.dns)
            self._scope_of = routes
        return self._scope.captures(destination)


async def _status(client: Running, request: cm.StatusRequest) -> Message:
    channels, flows, up, down = client.streams.totals()
    return cm.StatusAnswer(
        client.state,
        client.options.ssh_destination,
        client.method,
        os.getpid(),
        time.monotonic() - client.started,
        client.streams.reconnects,
        client.streams.up,
        len(client.streams.tunnels),
        channels,
        flows,
        up,
        down,
        client.streams.tcp_path,
        client.streams.shortcuts.entries if client.streams.shortcuts is not None else (),
    )


async def _connections(client: Running, request: cm.ConnectionsRequest) -> Message:
    found = client.streams.connections()
    return cm.ConnectionsAnswer(tuple(found[: cm.MAX_CONNECTIONS]), len(found))


async def _routes(client: Running, request: cm.RoutesRequest) -> Message:
    return cm.RoutesAnswer(client.subnets, client.all_excludes, client.dns)


async def _add(client: Running, request: cm.AddRoutesRequest) -> Message:
    async with client.changing:
        subnets = tuple(dict.fromkeys(client.subnets + request.subnets))
        excludes = tuple(dict.fromkeys(client.excludes + request.excludes))
        await _apply(client, subnets, excludes)
    return cm.AddRoutesAnswer(client.subnets, client.all_excludes)


async def _remove(client: Running, request: cm.RemoveRoutesRequest) -> Message:
    async with client.changing:
        await _apply(client, *_without(client, request))
    return cm.RemoveRoutesAnswer(client.subnets, client.all_excludes)


def _without(
    client: Running, request: cm.RemoveRoutesRequest
) -> Tuple[Tuple[Target, ...], Tuple[Target, ...]]:
    """The subnets and excludes without the request's; RequestRefused if one is not there."""
    missing = [t for t in request.subnets if t not in client.subnets]
    missing += [t for t in request.excludes if t not in client.excludes]
    if missing:
        fixed = [t for t in missing if t in client.fixed_excludes]
        if fixed:
            raise RequestRefused(f"{fixed[0][0]} is the ssh server's: it stays excluded")
        raise RequestRefused(f"not in the routes: {describe(missing[0])} (ctl routes lists them)")
    subnets = tuple(t for t in client.subnets if t not in request.subnets)
    if not subnets:
        raise RequestRefused("that would capture nothing: stop the client instead")
    return subnets, tuple(t for t in client.excludes if t not in request.excludes)


async def _apply(
    client: Running, subnets: Tuple[Target, ...], excludes: Tuple[Target, ...]
) -> None:
    if not client.ready:
        raise RequestRefused("the client is not ready yet")
    if client.stopping:
        raise RequestRefused("the client is stopping")
    if client.firewall_lost:
        raise RequestRefused("the firewall session is lost and being opened again: try later")
    all_excludes = tuple(dict.fromkeys(excludes + client.fixed_excludes))
    if client.streams.shortcuts is not None:
        await client.streams.shortcuts.drop_uncaptured(
            Scope(subnets, all_excludes, client.dns).captures
        )
    try:
        await client.firewall.update(subnets, all_excludes)
    except FirewallError as exc:
        raise RequestRefused(str(exc)) from None
    client.subnets, client.excludes = subnets, excludes


async def _hosts(client: Running, request: cm.HostsRequest) -> Message:
    return cm.HostsAnswer(client.hosts.written if client.hosts is not None else ())


async def _stop(client: Running, request: cm.StopRequest) -> Message:
    client.stop("a control request")
    return cm.StopAnswer()


TABLE: Dict[Type[Message], Callable[[Running, Message], Awaitable[Message]]] = {
    cm.StatusRequest: _status,  # type: ignore[dict-item]
    cm.ConnectionsRequest: _connections,  # type: ignore[dict-item]
    cm.RoutesRequest: _routes,  # type: ignore[dict-item]
    cm.AddRoutesRequest: _add,  # type: ignore[dict-item]
    cm.RemoveRoutesRequest: _remove,  # type: ignore[dict-item]
    cm.HostsRequest: _hosts,  # type: ignore[dict-item]
    cm.StopRequest: _stop,  # type: ignore[dict-item]
}


def handler(client: Running) -> Callable[[Message], Awaitable[Message]]:
    """The control server's handler for this client."""

    async def handle(request: Message) -> Message:
        serve = TABLE.get(type(request))
        if serve is None:
            raise RequestRefused(f"{type(request).__name__} is not a control request")
        return await serve(client, request)

    return handle

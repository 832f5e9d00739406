"""The client's real ControlServer, run in an event loop of its own thread, for the tests of
ControlClient and ctl: the sockets, ZAP and framing are the client's; only the request
handler is the test's (a table of canned answers), since no tunnel runs behind it."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shuttle_client.control import ControlServer, RequestRefused
from shuttle_protocol import control_messages as cm
from shuttle_protocol.firewall_messages import Target
from shuttle_protocol.schema import Message

START_TIMEOUT = 5.0

STATUS = cm.StatusAnswer(
    state="up",
    remote="alice@gw.example",
    method="nft",
    pid=4242,
    uptime=3723.5,
    reconnects=1,
    streams_up=1,
    streams=1,
    channels=2,
    flows=1,
    bytes_up=3 * 1024,
    bytes_down=5 * 1024 * 1024,
    tcp="ssh",
    shortcuts=(),
)
CONNECTIONS = cm.ConnectionsAnswer(
    (
        (7, 0, "tcp", "127.0.0.1:50000", "10.1.0.5", 80, 1024, 5 * 1024 * 1024, 65.0),
        (9, 0, "udp", "[::1]:50001", "fd00::53", 53, 2048, 0, 2.0),
    ),
    3,
)


@dataclass
class Table:
    """A canned handler: fixed status, connections and hosts; routes that add and remove
    change as a client would (remove refuses what is not there)."""

    subnets: tuple[Target, ...] = (("10.1.0.0/16", 1, 65535),)
    excludes: tuple[Target, ...] = ()
    dns: tuple[str, ...] = ("10.1.0.53",)
    hosts: tuple[tuple[str, str], ...] = (("db.internal", "10.1.0.7"),)
    stops: int = 0
    # Requests of these types wait for the event first (for tests of late answers).
    held: dict[type[Message], asyncio.Event] = field(default_factory=dict)
    answered: dict[type[Message], asyncio.Event] = field(default_factory=dict)

    async def handle(self, request: Message) -> Message:
        kind = type(request)
        if kind in self.held:
            await self.held[kind].wait()
        answer = self._answer(request)
        if kind in self.answered:
            self.answered[kind].set()
        return answer

    def _answer(self, request: Message) -> Message:
        fixed = {cm.StatusRequest: STATUS, cm.ConnectionsRequest: CONNECTIONS}
        if type(request) in fixed:
            return fixed[type(request)]
        if isinstance(request, cm.RoutesRequest):
            return cm.RoutesAnswer(self.subnets, self.excludes, self.dns)
        if isinstance(request, cm.HostsRequest):
            return cm.HostsAnswer(self.hosts)
        if isinstance(request, cm.StopRequest):
            self.stops += 1
            return cm.StopAnswer()
        if isinstance(request, cm.AddRoutesRequest):
            self.subnets = tuple(dict.fromkeys(self.subnets + request.subnets))
            self.excludes = tuple(dict.fromkeys(self.excludes + request.excludes))
            return cm.AddRoutesAnswer(self.subnets, self.excludes)
        if isinstance(request, cm.RemoveRoutesRequest):
            missing = [t for t in request.subnets if t not in self.subnets]
            if missing:
                raise RequestRefused(f"not captured: {missing[0][0]}")
            self.subnets = tuple(t for t in self.subnets if t not in request.subnets)
            self.excludes = tuple(t for t in self.excludes if t not in request.excludes)
            return cm.RemoveRoutesAnswer(self.subnets, self.excludes)
        raise RequestRefused(f"{type(request).__name__} is not served here")


class ServerThread:
    """A ControlServer at path, serving table.handle, until close()."""

    def __init__(self, path: str, table: Table) -> None:
        self.path = path
        self.table = table
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = ControlServer(path, table.handle)
        self.call(self.server.start)

    def call(self, make: Callable[[], Awaitable[Any]], timeout: float = START_TIMEOUT) -> Any:
        """Run a coroutine in the server's loop; its result."""

        async def run() -> Any:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def publish(self, event: Message) -> None:
        self.loop.call_soon_threadsafe(self.server.publish, event)

    def event(self, kind: type[Message], table: dict[type[Message], asyncio.Event]) -> None:
        """Make an asyncio.Event of the loop's under kind in one of the table's dicts."""

        async def make() -> None:
            table[kind] = asyncio.Event()

        self.call(make)

    def set(self, event: asyncio.Event) -> None:
        self.loop.call_soon_threadsafe(event.set)

    def close(self) -> None:
        """Close the server (its socket files go), then the loop and its thread."""
        if self.loop.is_closed():
            return

        async def shut() -> None:
            for event in self.table.held.values():
                event.set()  # let held handlers finish rather than be destroyed pending
            self.server.close()
            current = asyncio.current_task()
            pending = [task for task in asyncio.all_tasks() if task is not current]
            await asyncio.gather(*pending, return_exceptions=True)

        self.call(shut)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(START_TIMEOUT)
        self.loop.close()


@contextmanager
def short_directory() -> Iterator[Path]:
    """A fresh directory with a short path (an ipc path has at most 107 bytes, and pytest's
    tmp_path can be longer than that with a socket name under it)."""
    path = Path(tempfile.mkdtemp(prefix="ctl-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def running_server(table: Table | None = None) -> Iterator[ServerThread]:
    """A ServerThread at a fresh control.sock, closed afterwards."""
    with short_directory() as directory:
        server = ServerThread(str(directory / "run" / "control.sock"), table or Table())
        try:
            yield server
        finally:
            server.close()

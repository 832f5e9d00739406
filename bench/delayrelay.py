"""A TCP relay that delays every chunk by a fixed time each way: a long ssh hop on one
machine, since this kernel has no netem. A standalone script (standard library only).

    python3 delayrelay.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT --delay-ms=20

The bench runs it as root in the ssh server's namespace, in front of sshd. Every accepted
connection gets its own connection to the target; each chunk read from one side is written to
the other side the delay after it was read, in order, so a round trip takes twice the delay
more. What waits is bounded, as in a router's queue: past --buffer bytes waiting in one
direction the relay stops reading that side (TCP's flow control then holds the sender), and
it holds back a direction whose receiver does not take its writes. It does nothing per byte
(chunks of up to 256 KiB pass as they are), so it is not what limits a tunnel's throughput.
It prints "delayrelay: listening" when ready and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import sys

WRITE_BUFFER = 4 << 20  # a receiver's transport buffer past which its sender is held back


class Side(asyncio.Protocol):
    """One end of a relayed connection: what it reads waits in its queue, then goes to the
    other end's transport. An accepted side (target given) connects its partner first."""

    def __init__(self, delay: float, limit: int, target: tuple[str, int] | None = None) -> None:
        self.delay = delay
        self.limit = limit
        self.target = target
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0  # bytes in the queue
        self.timer: asyncio.TimerHandle | None = None
        self.reading = True
        self.held = False  # the peer's transport buffer is full: wait for it to drain
        self.eof_passed = False
        self.joining: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):
            raise TypeError(f"a stream transport was expected, not {transport!r}")
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER)
        if self.target is not None:
            transport.pause_reading()  # nothing is read before the other end exists
            self.joining = self.loop.create_task(self.join(self.target))

    async def join(self, target: tuple[str, int]) -> None:
        try:
            _transport, partner = await self.loop.create_connection(
                lambda: Side(self.delay, self.limit), *target
            )
        except OSError as exc:
            print(f"delayrelay: cannot reach {target}: {exc!r}", flush=True)
            if self.transport is not None:
                self.transport.close()
            return
        self.peer, partner.peer = partner, self
        if self.transport is None or self.transport.is_closing():
            if partner.transport is not None:
                partner.transport.close()
            return
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.push(data)
        if self.queued >= self.limit and self.transport is not None:
            self.transport.pause_reading()
            self.reading = False

    def eof_received(self) -> bool:
        self.push(None)
        return True  # keep the other direction open until its own EOF has passed

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.held = True

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.held = False
            self.peer.flush()

    def push(self, data: bytes | None) -> None:
        self.queue.append((self.loop.time() + self.delay, data))
        self.queued += len(data or b"")
        self.schedule()

    def schedule(self) -> None:
        if self.timer is None and self.queue and not self.held:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def flush(self) -> None:
        """Pass on every chunk whose time has come, as far as the receiver takes them."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        peer = self.peer
        if peer is None or peer.transport is None or peer.transport.is_closing():
            return
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now and not self.held:
            _due, data = self.queue.popleft()
            if data is None:
                self.eof_passed = True
                try:
                    peer.transport.write_eof()
                except OSError:  # the receiver is gone already (reset)
                    peer.transport.close()
                if peer.eof_passed and self.transport is not None:
                    self.transport.close()
                    peer.transport.close()
                return
            self.queued -= len(data)
            peer.transport.write(data)
        if not self.reading and self.queued <= self.limit // 2 and self.transport is not None:
            self.transport.resume_reading()
            self.reading = True
        self.schedule()


async def serve(listen: tuple[str, int], target: tuple[str, int], delay: float, limit: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Side(delay, limit, target), *listen, reuse_address=True
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"delayrelay: listening on {listen} for {target}, {delay * 1000:g} ms", flush=True)
    async with server:
        await stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(prog="delayrelay", description=__doc__.split("\n")[0])
    parser.add_argument("listen_host")
    parser.add_argument("listen_port", type=int)
    parser.add_argument("target_host")
    parser.add_argument("target_port", type=int)
    parser.add_argument("--delay-ms", type=float, default=20, help="added each way")
    parser.add_argument("--buffer", type=int, default=32 << 20, help="bytes waiting, per way")
    args = parser.parse_args()
    listen = (args.listen_host, args.listen_port)
    target = (args.target_host, args.target_port)
    asyncio.run(serve(listen, target, args.delay_ms / 1000, args.buffer))
    return 0


if __name__ == "__main__":
    sys.exit(main())

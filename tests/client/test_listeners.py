"""The redirect listeners (shuttle_client.proxy): a burst of connections that comes faster
than the client accepts waits in the kernel's queue, LISTEN_BACKLOG deep while served; a
connection the queue cannot hold is dropped by the kernel, and its program waits seconds
for a retransmitted SYN."""

import asyncio
import selectors
import socket
import time
from typing import List, Optional

from shuttle_client.proxy import make_listeners, serve
from shuttle_ends.relay import Link

# Far past asyncio's own default backlog of 100, and within the test's open-file limit.
BURST = 600
WAIT = 3.0  # seconds for the kernel to complete every handshake: it needs microseconds


class NoTunnel:
    """Streams with no stream up: nothing is ever accepted during the test anyway."""

    def pick(self) -> Optional[Link]:
        return None

    def hold(self, waiting: object) -> bool:
        return False

    def release(self, waiting: object) -> None:
        pass

    def index(self, link: Link) -> int:
        return 0


def established(socks: List[socket.socket]) -> int:
    """How many of these connecting sockets complete their handshake within WAIT."""
    done = 0
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + WAIT
        while done < len(socks) and time.monotonic() < deadline:
            for key, _ in selector.select(deadline - time.monotonic()):
                selector.unregister(key.fileobj)
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    done += 1
    return done


def test_a_burst_the_client_has_not_accepted_yet_waits_in_the_queue() -> None:
    async def burst() -> int:
        (listener,) = make_listeners([("127.0.0.1", 0)])
        servers = await serve(NoTunnel(), [listener], lambda sock: ("127.0.0.1", 9), 1.0)
        socks: List[socket.socket] = []
        try:
            for _ in range(BURST):
                sock = socket.socket()
                socks.append(sock)
                sock.setblocking(False)
                sock.connect_ex(listener.getsockname())
            # The loop does not run until this returns: only the kernel's queue holds them.
            return established(socks)
        finally:
            for sock in socks:
                sock.close()
            for server in servers:
                server.close()
            listener.close()

    assert asyncio.run(burst()) == BURST

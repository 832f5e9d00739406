"""The agent's side of the fast-path probe: a loopback listener on the server for the one
connection that the client opens through ssh's own TCP forwarding (ProbeListen)."""

import asyncio
import logging
import socket

from shuttle_ends.relay import Link
from shuttle_protocol.stream_messages import ProbeListening

log = logging.getLogger("shuttle")

# The client's connection comes within a round trip or two; past this nobody is coming.
PROBE_WAIT = 30.0


async def listen_once(link: Link) -> None:
    """Listen on 127.0.0.1, say where (port 0 if we cannot), take one connection, close."""
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setblocking(False)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
    except OSError as exc:
        log.debug("cannot listen for the probe: %s", exc)
        listener.close()
        link.send(ProbeListening(0))
        return
    with listener:
        link.send(ProbeListening(listener.getsockname()[1]))
        try:
            conn, _ = await asyncio.wait_for(loop.sock_accept(listener), PROBE_WAIT)
        except asyncio.TimeoutError:
            log.debug("the probe connection did not come")
            return
        conn.close()

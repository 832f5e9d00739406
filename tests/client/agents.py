"""A real agent behind a stand-in for ssh (conftest's fake_ssh), and what tests do with it:
start a tunnel, open channels on its link, echo bytes through them."""

import asyncio
import glob
import socket
from typing import Any, Coroutine, Optional

from shuttle_client.cli import parse_args
from shuttle_client.tunnel import Tunnel
from shuttle_ends.relay import Link, Relay


def oldest_python(pattern: str) -> Optional[str]:
    found = sorted(glob.glob(f"/root/.pyenv/versions/{pattern}/bin/python3"))
    return found[0] if found else None


async def start(fake_ssh: str, python: Optional[str] = "/usr/bin/python3") -> Tunnel:
    """A tunnel through fake_ssh, on python (None: the command line's default)."""
    chosen = [] if python is None else ["--python", python]
    options = parse_args(["-r", "server", "-e", fake_ssh, *chosen, "10.0.0.0/8"])
    tunnel = Tunnel(options)
    await tunnel.start()
    return tunnel


async def echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def open_channel(tunnel: Tunnel, port: int) -> socket.socket:
    """A channel to 127.0.0.1:port; returns the program's end of a socket pair."""
    return await open_on_link(tunnel.link, port)


async def open_on_link(link: Link, port: int) -> socket.socket:
    """A channel on link to 127.0.0.1:port; returns the program's end of a socket pair."""
    ours, program = socket.socketpair()
    relay = Relay(link, link.mux.open("127.0.0.1", port))
    await asyncio.get_running_loop().create_connection(lambda: relay, sock=ours)
    link.schedule_flush()
    program.setblocking(False)
    return program


async def exchange(program: socket.socket, data: bytes) -> bytes:
    loop = asyncio.get_running_loop()

    async def send() -> None:
        await loop.sock_sendall(program, data)
        program.shutdown(socket.SHUT_WR)

    sender = asyncio.ensure_future(send())
    received = bytearray()
    try:
        while chunk := await asyncio.wait_for(loop.sock_recv(program, 1 << 20), 30):
            received += chunk
        await sender
    finally:
        program.close()
    return bytes(received)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


class RecordingPipe:
    """Stands in for the ssh pipe's write transport: keeps what the Link writes."""

    def __init__(self) -> None:
        self.data = b""

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

"""The ssh server's own addresses, excluded from capture so that 0/0 and ::/0 just work, and
pinned for reconnecting when DNS is captured."""

import asyncio
import logging
import socket
from typing import List, NamedTuple, Optional, Sequence, Tuple

from shuttle_protocol.firewall_messages import ALL_PORTS, Target

log = logging.getLogger("shuttle")

SSH_G_TIMEOUT = 10.0


class Server(NamedTuple):
    """The host ssh connects to (after ~/.ssh/config) and its addresses."""

    hostname: str
    addresses: Tuple[str, ...]

    @property
    def excludes(self) -> Tuple[Target, ...]:
        """Every address as a whole-host exclude."""
        return tuple((f"{a}/{128 if ':' in a else 32}", *ALL_PORTS) for a in self.addresses)

    def pinned(self) -> Tuple[str, ...]:
        """ssh options that connect to the address found now, without asking DNS: with
        --dns, ssh's own query would be captured and wait for the very tunnel it is to
        bring back. Host keys are still checked under the host's name."""
        if not self.addresses or self.hostname in self.addresses:
            return ()
        return ("-o", f"HostName={self.addresses[0]}", "-o", f"HostKeyAlias={self.hostname}")


async def find_server(ssh_cmd: Sequence[str], destination: str, port: Optional[int]) -> Server:
    """Where ssh connects for destination; no addresses if the name does not resolve."""
    host = await _hostname(ssh_cmd, destination, port)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        log.warning("cannot resolve the ssh server %r to exclude it: %s", host, exc)
        return Server(host, ())
    return Server(host, tuple(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos)))


async def _hostname(ssh_cmd: Sequence[str], destination: str, port: Optional[int]) -> str:
    """The host ssh really connects to (after ~/.ssh/config), from `ssh -G`."""
    fallback = destination.rpartition("@")[2]
    port_args: List[str] = ["-p", str(port)] if port else []
    try:
        process = await asyncio.create_subprocess_exec(
            *ssh_cmd,
            "-G",
            *port_args,
            destination,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        output, _ = await asyncio.wait_for(process.communicate(), SSH_G_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        return fallback
    for line in output.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        if key == "hostname" and value:
            return value.strip()
    return fallback

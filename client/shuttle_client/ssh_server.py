"""The ssh server's own addresses, excluded from capture so that 0/0 and ::/0 just work."""

import asyncio
import logging
import socket
from typing import List, Optional, Sequence, Tuple

from shuttle_protocol.firewall_messages import ALL_PORTS, Target

log = logging.getLogger("shuttle")

SSH_G_TIMEOUT = 10.0


async def server_targets(
    ssh_cmd: Sequence[str], destination: str, port: Optional[int]
) -> Tuple[Target, ...]:
    """Every address ssh connects to for destination, as whole-host excludes."""
    host = await _hostname(ssh_cmd, destination, port)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        log.warning("cannot resolve the ssh server %r to exclude it: %s", host, exc)
        return ()
    addresses = dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos)
    return tuple(
        (f"{address}/{128 if ':' in address else 32}", *ALL_PORTS) for address in addresses
    )


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

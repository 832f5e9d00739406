"""The ssh server's own addresses, excluded from capture so that 0/0 and ::/0 just work, and
pinned for reconnecting when DNS is captured."""

import asyncio
import logging
import os
import shlex
import socket
from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

from shuttle_protocol.firewall_messages import ALL_PORTS, Target

from .cli import UsageError, parse_remote

log = logging.getLogger("shuttle")

SSH_G_TIMEOUT = 10.0


class Server(NamedTuple):
    """The host ssh connects to (after ~/.ssh/config) and its addresses, and the addresses
    of the jump hosts on the way (ProxyJump, or the ssh of a ProxyCommand)."""

    hostname: str
    addresses: Tuple[str, ...]
    jumps: Tuple[str, ...] = ()
    # Whether the excludes cover every TCP connection ssh makes on its way there: ssh -G
    # answered for each hop, each resolved, and no ProxyCommand hides where it connects.
    # Then the rules may go in while ssh connects (as they stand during a reconnect).
    covered: bool = False

    @property
    def excludes(self) -> Tuple[Target, ...]:
        """Every address, the jump hosts' too, as a whole-host exclude: otherwise 0/0
        through a jump host captures ssh's own connection (and its reconnect)."""
        addresses = dict.fromkeys(self.addresses + self.jumps)
        return tuple((f"{a}/{128 if ':' in a else 32}", *ALL_PORTS) for a in addresses)

    def pinned(self) -> Tuple[str, ...]:
        """ssh options that connect to the address found now, without asking DNS: with
        --dns, ssh's own query would be captured and wait for the very tunnel it is to
        bring back. Host keys are still checked under the host's name."""
        if not self.addresses or self.hostname in self.addresses:
            return ()
        return ("-o", f"HostName={self.addresses[0]}", "-o", f"HostKeyAlias={self.hostname}")


Hop = Tuple[Tuple[str, ...], str, Optional[int]]  # (ssh command, destination, port)

MAX_HOPS = 8  # jump hosts followed, a bound against a config whose hops form a loop
# ssh's options that take an argument (OpenSSH 9), to find a ProxyCommand's destination.
SSH_ARG_OPTIONS = "BbcDEeFIiJLlmOoPpQRSWw"


async def find_server(ssh_cmd: Sequence[str], destination: str, port: Optional[int]) -> Server:
    """Where ssh connects for destination, and through which jump hosts; no addresses
    for a name that does not resolve."""
    config = await _ssh_config(tuple(ssh_cmd), destination, port)
    host = config.get("hostname") or destination.rpartition("@")[2]
    addresses = await _resolve(host, "the ssh server")
    jumps: List[str] = []
    hops, known = jump_hops(tuple(ssh_cmd), config)
    covered = bool(config and addresses) and known
    seen: Set[Hop] = set()
    while hops and len(seen) < MAX_HOPS:
        hop = hops.pop(0)
        if hop in seen:
            continue
        seen.add(hop)
        hop_config = await _ssh_config(*hop)
        hop_host = hop_config.get("hostname") or hop[1].rpartition("@")[2]
        hop_addresses = await _resolve(hop_host, "the jump host")
        jumps += hop_addresses
        found, known = jump_hops(hop[0], hop_config)
        covered = covered and bool(hop_config and hop_addresses) and known
        hops += found
    if jumps:
        log.info("not capturing the ssh jump hosts: %s", " ".join(dict.fromkeys(jumps)))
    covered = covered and not [hop for hop in hops if hop not in seen]  # none left unasked
    return Server(host, addresses, tuple(dict.fromkeys(jumps)), covered)


def jump_hops(ssh_cmd: Tuple[str, ...], config: Dict[str, str]) -> Tuple[List[Hop], bool]:
    """The jump hosts that `ssh -G`'s config names: each of a ProxyJump chain (the first
    is where this host connects; excluding the later ones too costs nothing), or the
    destination of a ProxyCommand that runs ssh; and whether that is all of where ssh
    connects: any other ProxyCommand is opaque, and so is a hop that cannot be parsed."""
    jump = config.get("proxyjump", "none")
    if jump != "none":
        hops: List[Hop] = []
        known = True
        for part in filter(None, (part.strip() for part in jump.split(","))):
            item = part[len("ssh://") :] if part.startswith("ssh://") else part
            try:
                hops.append((ssh_cmd, *parse_remote(item)))
            except UsageError as exc:
                log.warning("ProxyJump %s: %s", item, exc)
                known = False
        return hops, known
    command = config.get("proxycommand", "none")
    if command == "none":
        return [], True
    try:
        words = shlex.split(command)
    except ValueError:
        return [], False
    if not words or os.path.basename(words[0]) != "ssh":
        return [], False
    command_line, index = [words[0]], 1
    while index < len(words) and words[index].startswith("-"):
        option = words[index]
        step = 2 if option[-1] in SSH_ARG_OPTIONS and len(option) == 2 else 1
        if option != "-W":  # -W %h:%p: ssh -G would refuse the unexpanded tokens
            command_line += words[index : index + step]
        index += step
    if index >= len(words):
        return [], False
    return [(tuple(command_line), words[index], None)], True


async def _resolve(host: str, what: str) -> Tuple[str, ...]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        log.warning("cannot resolve %s %r to exclude it: %s", what, host, exc)
        return ()
    return tuple(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))


async def _ssh_config(
    ssh_cmd: Tuple[str, ...], destination: str, port: Optional[int]
) -> Dict[str, str]:
    """ssh's configuration for destination (after ~/.ssh/config), from `ssh -G`; empty if
    that fails."""
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
        return {}
    config: Dict[str, str] = {}
    for line in output.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        if value.strip():
            config.setdefault(key.lower(), value.strip())
    return config

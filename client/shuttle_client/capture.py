"""Where captured traffic enters the client: our own listeners (nat, nft), or the
transparent TCP and UDP sockets that firewalld hands over (tproxy)."""

import asyncio
import logging
import socket
from typing import List, Optional, Sequence

from .dns import DnsRelay, Nameserver
from .firewall_session import FirewallSession
from .proxy import Destination, Take, Tunnels, local_address, original_destination, serve
from .udp import UdpRelay

log = logging.getLogger("shuttle")

# The tproxy method ignores the request's port: firewalld binds the transparent sockets.
TPROXY_ANY_PORT = 1


class Capture:
    """The accepting side of one session, whatever the firewall method."""

    def __init__(
        self,
        tunnels: Tunnels,
        firewall: FirewallSession,
        listeners: Sequence[socket.socket],
        wait: float,
        take: Optional[Take] = None,
    ) -> None:
        """wait: how long a connection may wait for a tunnel while none is up; take: the
        TCP fast path, which may take a connection before the agent's path sees it."""
        self.tunnels = tunnels  # the tunnel for a new connection or flow
        self.take = take
        self.wait = wait
        self.firewall = firewall
        self.listeners = list(listeners)
        self.nameserver: Optional[Nameserver] = None
        self.servers: List[asyncio.Server] = []
        self.udp: Optional[UdpRelay] = None
        self.dns: Optional[DnsRelay] = None

    def add_dns(self, nameserver: Nameserver, sockets: Sequence[socket.socket]) -> None:
        """--dns: captured DNS goes to nameserver; sockets are our UDP sockets that nat and
        nft redirect queries to (none with tproxy, whose sockets firewalld makes)."""
        self.nameserver = nameserver
        if sockets:
            self.dns = DnsRelay(self.tunnels.pick, list(sockets), nameserver.server)

    def _rewritten(self, destination: Destination) -> Destination:
        nameserver = self.nameserver
        if nameserver is None:
            return destination
        return lambda sock: nameserver.rewrite(destination(sock))

    async def start(self, method: str, agent_capabilities: Sequence[str]) -> int:
        """Start accepting; returns the port the rules divert to."""
        if self.dns is not None:
            self.dns.start()
        if method != "tproxy":
            destination = self._rewritten(original_destination)
            self.servers = await serve(
                self.tunnels, self.listeners, destination, self.wait, self.take
            )
            return int(self.listeners[0].getsockname()[1])
        port, sockets = await self.firewall.tproxy_sockets()
        self.listeners = [sock for kind, sock in sockets.items() if kind.startswith("tcp")]
        # TPROXY does not rewrite the destination: the accepted socket's own address is it.
        self.servers = await serve(
            self.tunnels, self.listeners, self._rewritten(local_address), self.wait, self.take
        )
        udp = [sock for kind, sock in sockets.items() if kind.startswith("udp")]
        if "udp" in agent_capabilities:
            rewrite = self.nameserver.rewrite if self.nameserver else lambda address: address
            self.udp = UdpRelay(self.tunnels.pick, self.firewall, udp, rewrite)
            self.udp.start()
        else:
            log.warning("the agent cannot relay UDP: captured datagrams are dropped")
            for sock in udp:
                sock.close()
        return port

    def close(self) -> None:
        for server in self.servers:
            server.close()
        if self.udp is not None:
            self.udp.close()
        if self.dns is not None:
            self.dns.close()
        for listener in self.listeners:
            listener.close()

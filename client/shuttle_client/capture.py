"""Where captured traffic enters the client: our own listeners (nat, nft), or the
transparent TCP and UDP sockets that firewalld hands over (tproxy)."""

import asyncio
import logging
import socket
from typing import Callable, List, Optional, Sequence, Tuple

from .dns import DnsRelay, Nameserver
from .firewall_session import FirewallSession
from .proxy import (
    Destination,
    NotCaptured,
    Take,
    Tunnels,
    local_address,
    original_destination,
    serve,
)
from .split_dns import SplitDns
from .targets import endpoint
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
        captures: Callable[[Tuple[str, int]], bool],
        *,
        take: Optional[Take] = None,
    ) -> None:
        """wait: how long a connection may wait for a tunnel while none is up; captures:
        whether an original destination is one the session captures (targets.Scope), as
        it is now: anything else reached the listener without the firewall; take: the TCP
        fast path, which may take a connection before the agent's path sees it."""
        self.tunnels = tunnels  # the tunnel for a new connection or flow
        self.captures = captures
        self.take = take
        self.wait = wait
        self.firewall = firewall
        self.listeners = list(listeners)
        self.method = ""
        self._capabilities: Sequence[str] = ()
        self.nameserver: Optional[Nameserver] = None
        self.servers: List[asyncio.Server] = []
        self.udp: Optional[UdpRelay] = None
        self.dns: Optional[DnsRelay] = None
        self.split: Optional[SplitDns] = None

    def add_dns(self, nameserver: Nameserver, sockets: Sequence[socket.socket]) -> None:
        """--dns: captured DNS goes to nameserver; sockets are our UDP sockets that nat and
        nft redirect queries to (none with tproxy, whose sockets firewalld makes)."""
        self.nameserver = nameserver
        if sockets:
            self.dns = DnsRelay(self.tunnels.pick, list(sockets), nameserver.server)

    def _rewritten(self, destination: Destination) -> Destination:
        """destination, checked (NotCaptured), and rewritten for --dns."""
        nameserver = self.nameserver

        def checked(sock: socket.socket) -> Tuple[str, int]:
            found = destination(sock)
            if not self.captures(found):
                raise NotCaptured(endpoint(found))
            return nameserver.rewrite(found) if nameserver is not None else found

        return checked

    def rules_port(self) -> int:
        """The port to ask firewalld to divert to: our listeners' (tproxy: none of ours,
        firewalld makes the sockets and the port given does not matter)."""
        if self.method == "tproxy" or not self.listeners:
            return TPROXY_ANY_PORT
        return int(self.listeners[0].getsockname()[1])

    def _split(self, original: Destination) -> None:
        """--dns-domains: the queries for other names stay local (split_dns.py)."""
        nameserver = self.nameserver
        if nameserver is None or not nameserver.domains:
            return
        self.split = SplitDns(nameserver.domains, self.firewall, nameserver.order, original)
        if self.dns is not None:
            self.dns.split = self.split
            for family in (4, 6):
                captured = [a for a in nameserver.order if (":" in a) == (family == 6)]
                if len(captured) > 1:
                    log.warning(
                        "split DNS with %s: UDP queries for other names sent to any of %s go "
                        "to %s (the redirect hides which one they were sent to; TCP ones go "
                        "where they were sent)",
                        self.method,
                        " ".join(captured),
                        captured[0],
                    )

    async def _serve(self, original: Destination) -> List[asyncio.Server]:
        destination = self._rewritten(original)
        split, take = self.split, self.take
        if split is None:
            return await serve(self.tunnels, self.listeners, destination, self.wait, take)

        def take_unless_dns(conn: socket.socket, found: Destination) -> bool:
            # A DNS connection waits for its first query (split_dns.TcpQuery): not ssh's.
            try:
                if split.is_resolver(original(conn)):
                    return False
            except OSError:
                return False
            return take is not None and take(conn, found)

        return await serve(
            self.tunnels,
            self.listeners,
            destination,
            self.wait,
            take_unless_dns if take is not None else None,
            relay=split.relay,
        )

    async def start(self, method: str, agent_capabilities: Sequence[str]) -> int:
        """Start accepting; returns the port the rules divert to."""
        self.method, self._capabilities = method, agent_capabilities
        self._split(local_address if method == "tproxy" else original_destination)
        if self.dns is not None:
            self.dns.start()
        if method != "tproxy":
            self.servers = await self._serve(original_destination)
            return self.rules_port()
        return await self._take_tproxy_sockets()

    async def reopened(self) -> int:
        """The firewall session was opened anew; the port its rules divert to. Our own
        listeners stay; a tproxy session's transparent sockets are its own, so the new
        session's replace the old ones (connections accepted already go on)."""
        if self.split is not None:
            self.split.udp.close()  # their mark was the old session's
        if self.method != "tproxy":
            return self.rules_port()
        self._stop_accepting()
        return await self._take_tproxy_sockets()

    async def _take_tproxy_sockets(self) -> int:
        port, sockets = await self.firewall.tproxy_sockets()
        self.listeners = [sock for kind, sock in sockets.items() if kind.startswith("tcp")]
        # TPROXY does not rewrite the destination: the accepted socket's own address is it.
        self.servers = await self._serve(local_address)
        udp = [sock for kind, sock in sockets.items() if kind.startswith("udp")]
        if "udp" in self._capabilities:
            rewrite = self.nameserver.rewrite if self.nameserver else lambda address: address
            self.udp = UdpRelay(self.tunnels.pick, self.firewall, udp, self.captures, rewrite)
            self.udp.split = self.split
            self.udp.start()
        else:
            log.warning("the agent cannot relay UDP: captured datagrams are dropped")
            for sock in udp:
                sock.close()
        return port

    def _stop_accepting(self) -> None:
        for server in self.servers:
            server.close()
        self.servers = []
        if self.udp is not None:
            self.udp.close()
            self.udp = None
        for listener in self.listeners:
            listener.close()
        self.listeners = []

    def close(self) -> None:
        self._stop_accepting()
        if self.dns is not None:
            self.dns.close()
        if self.split is not None:
            self.split.close()

"""--dns-domains (split DNS): through one capture of a resolver on the client host, a name
in the domains is answered by the nameserver only the server's side reaches (T's dnsmasq),
and any other name by the resolver the query was sent to (a dnsmasq in C), over UDP and
TCP; a SOCKS client's names in the domains resolve on the server's side.

C's resolver here is a dnsmasq that alone knows LOCAL_NAME: on C's 127.0.0.53 (nft, nat),
or, for tproxy, which refuses a resolver on this host, on the LAN (S's address towards C,
reached directly). T's alone knows DNS_NAME. Each logs every query with its source.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testbed import HTTP_PORT, Shuttle, Topology
from testbed.config import DNS_ANSWER, DNS_NAME, S_ADDR_C, S_ADDR_T
from testbed.servers import DNS_LOG, dnsmasq_argv

pytestmark = pytest.mark.integration

# Where the local resolver is, by method: in C on loopback, or on the LAN in S.
LOCAL_RESOLVER = {"nft": ("c", "127.0.0.53"), "nat": ("c", "127.0.0.53"), "tproxy": ("s", S_ADDR_C)}
LOCAL_NAME = "printer.lan.test"
LOCAL_ANSWER = "198.18.1.77"
LOCAL_LOG = "local-dns.log"
SOCKS = 10802


def dig(topo: Topology, resolver: str, *args: str) -> subprocess.CompletedProcess[str]:
    """dig +short at resolver, as the test user in C; one try of 3 s."""
    argv = ["dig", "+short", "+time=3", "+tries=1", f"@{resolver}", *args]
    return topo.run_as_user(argv, timeout=20)


def answered(result: subprocess.CompletedProcess[str], address: str) -> bool:
    return result.returncode == 0 and result.stdout.split() == [address]


def asked(log: Path, name: str) -> list[str]:
    """A dnsmasq log's lines of queries for name ("query[A] NAME from ADDR")."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [line for line in text.splitlines() if f"] {name} from" in line]


def start_local_resolver(topo: Topology, method: str) -> Path:
    """dnsmasq where method's local resolver is, knowing LOCAL_NAME and nothing else; its
    log."""
    where, address = LOCAL_RESOLVER[method]
    ns = topo.c if where == "c" else topo.s
    log = topo.logs / LOCAL_LOG
    argv = dnsmasq_argv([address], [(LOCAL_NAME, LOCAL_ANSWER)])
    topo.procs.append(ns.start("local-dns", argv, log))
    assert ns.wait_listening(53, udp=True), log.read_text(errors="replace")
    return log


def test_names_in_the_domains_go_remote_and_others_to_the_resolver_asked(
    shuttle: Shuttle, method: str
) -> None:
    topo = shuttle.topo
    local_log = start_local_resolver(topo, method)
    resolver = LOCAL_RESOLVER[method][1]
    shuttle.start_client(
        method=method,
        extra=[
            f"--ns-hosts={resolver}",
            "--dns-domains=shuttle.test",
            f"--socks=127.0.0.1:{SOCKS}",
        ],
    )
    for transport in ((), ("+tcp",)):
        remote = dig(topo, resolver, *transport, DNS_NAME)
        assert answered(remote, DNS_ANSWER), f"{transport} {remote}\n{shuttle.outputs()}"
        local = dig(topo, resolver, *transport, LOCAL_NAME)
        assert answered(local, LOCAL_ANSWER), f"{transport} {local}\n{shuttle.outputs()}"
    remote_log = topo.logs / DNS_LOG
    # The remote names were asked by the agent on S, never by C's resolver; the local
    # names only there, from C itself (the bypass socket), never through the tunnel.
    seen = asked(remote_log, DNS_NAME)
    assert len(seen) >= 2 and all(line.endswith(f"from {S_ADDR_T}") for line in seen), seen
    assert asked(remote_log, LOCAL_NAME) == []
    assert asked(local_log, DNS_NAME) == []
    assert len(asked(local_log, LOCAL_NAME)) >= 2
    # A SOCKS client's name in the domains resolves on the server's side (T's nameserver
    # alone knows it) and reaches T's page.
    page = topo.run_as_user(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--socks5-hostname",
            f"127.0.0.1:{SOCKS}",
            f"http://{DNS_NAME}:{HTTP_PORT}/",
        ],
        timeout=20,
    )
    assert page.returncode == 0 and topo.marker in page.stdout, f"{page}\n{shuttle.outputs()}"

"""Traffic in the namespace: routed networks, scripts that connect and query there, and a
client of another uid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .daemon import NOBODY

ROUTED = ("198.18.0.1/15", "fd00:5e::1/32")
ROUTED_NETWORKS = ("198.18.0.0/15", "fd00:5e::/32")


def in_netns(netns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, *argv], check=True, timeout=10)


def add_link_with(netns: str, addresses: tuple[str, str]) -> None:
    """A veth pair with both ends in netns (this kernel has no dummy interfaces), the IPv4
    and IPv6 address on one end: routed there, and nothing answers."""
    in_netns(netns, "ip", "link", "add", "fwt0", "type", "veth", "peer", "name", "fwt1")
    for link in ("fwt0", "fwt1"):
        in_netns(netns, "ip", "link", "set", link, "up")
    in_netns(netns, "ip", "addr", "add", addresses[0], "dev", "fwt0")
    in_netns(netns, "ip", "-6", "addr", "add", addresses[1], "dev", "fwt0", "nodad")


NAMESERVERS = ("10.53.0.53", "fd00:53::53")  # routed out of the namespace: nothing answers
NAMESERVER_NET = ("10.53.0.1/24", "fd00:53::1/64")
NAMESERVER_NETWORKS = ("10.53.0.0/24", "fd00:53::/64")
CONNECT = """\
import json, socket, sys
results = []
for host, port in json.loads(sys.argv[1]):
    try:
        socket.create_connection((host, port), timeout=5).close()
        results.append("connected")
    except ConnectionRefusedError:
        results.append("refused")
    except OSError as exc:
        results.append(type(exc).__name__)
print(json.dumps(results))
"""


def write(path: Path, data: bytes, mode: int = 0o644) -> str:
    """A file (a policy, a hosts file) with these bytes and mode; its path."""
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


def script_argv(
    netns: str, script: str, targets: list[tuple[str, int]], as_nobody: bool
) -> list[str]:
    """The command that runs script on targets inside the namespace (as nobody, or root)."""
    user = NOBODY if as_nobody else []
    return ["ip", "netns", "exec", netns, *user, sys.executable, "-c", script, json.dumps(targets)]


def run_script(
    netns: str, script: str, targets: list[tuple[str, int]], as_nobody: bool
) -> list[str]:
    """What script_argv's command prints: one result per target."""
    done = subprocess.run(
        script_argv(netns, script, targets, as_nobody),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result: list[str] = json.loads(done.stdout)
    return result


def connect(netns: str, targets: list[tuple[str, int]], as_nobody: bool = False) -> list[str]:
    """Connect to each (host, port) from inside the namespace: connected, refused, or why not."""
    return run_script(netns, CONNECT, targets, as_nobody)


QUERY = """\
import json, socket, sys
results = []
for host, port in json.loads(sys.argv[1]):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect((host, port))  # so only an answer from (host, port) comes in
            sock.send(b"query")
            results.append(sock.recv(2048).decode())
        except PermissionError:  # a REJECT in filter OUTPUT
            results.append("blocked")
        except ConnectionRefusedError:  # an ICMP error: nobody there
            results.append("refused")
        except OSError as exc:
            results.append(type(exc).__name__)
print(json.dumps(results))
"""


def query_argv(netns: str, targets: list[tuple[str, int]], as_nobody: bool = False) -> list[str]:
    """The command that sends one UDP datagram to each (host, port) from inside the
    namespace and prints what came back: the answer, blocked, refused, or why not."""
    return script_argv(netns, QUERY, targets, as_nobody)


def query(netns: str, targets: list[tuple[str, int]], as_nobody: bool = False) -> list[str]:
    """What query_argv prints: for each target, the answer, or why there was none."""
    return run_script(netns, QUERY, targets, as_nobody)


NOBODY_CLIENT = """\
import asyncio, json, sys
from shuttle_client.firewall_session import FirewallError, FirewallSession

async def main():
    client = FirewallSession(sys.argv[1])
    try:
        print("opened", await client.open(**json.loads(sys.argv[2])))
    except FirewallError as exc:
        print(exc)
    finally:
        await client.close()

asyncio.run(main())
"""


def as_nobody(socket_path: Path, **request: object) -> str:
    """What a FirewallSession run by uid 65534 gets for open(**request): "opened METHOD" (and
    then it closes the session at once) or the error text."""
    done = subprocess.run(
        [*NOBODY, sys.executable, "-c", NOBODY_CLIENT, str(socket_path), json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()

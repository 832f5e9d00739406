"""The command line: docopt usage text, parsed into a checked Options value."""

import ipaddress
import shlex
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from docopt import DocoptExit, docopt

from . import __version__

USAGE = """\
shuttle-client: a transparent-proxy VPN over ssh.

Captures this user's TCP connections to SUBNETs and carries them over one ssh session
to the server, which makes them from there. Firewall rules come from shuttle-firewalld.

Usage:
  shuttle-client [options] -r HOST [-x SUBNET]... SUBNET...
  shuttle-client -h | --help
  shuttle-client --version

Arguments:
  SUBNET                   a.b.c.d[/width]: the networks to capture.

Options:
  -r, --remote=HOST        ssh destination: [user@]host[:port].
  -x, --exclude=SUBNET     do not capture this network (repeatable).
  -l, --listen=ADDR        local redirect listener, [ip:]port [default: 127.0.0.1:0]
                           (port 0: any free port).
  -e, --ssh-cmd=CMD        the ssh command, with its options [default: ssh].
  --python=PATH            python on the server [default: python3].
  --method=METHOD          firewall method: nat [default: nat].
  --firewalld=PATH         firewalld's socket [default: /run/shuttle/firewalld.sock].
  -v, --verbose            say more (also the agent's debug lines).
  -h, --help               show this text.
  --version                show the version.
"""


class UsageError(Exception):
    """A mistake on the command line; the text says which argument and why."""


@dataclass(frozen=True)
class Options:
    """Everything the command line decides, checked."""

    ssh_destination: str
    ssh_port: Optional[int]
    subnets: Tuple[str, ...]
    excludes: Tuple[str, ...]
    listen: Tuple[str, int]
    ssh_cmd: Tuple[str, ...]
    python: str
    method: str
    firewalld: str
    verbose: bool


def parse_subnet(text: str) -> str:
    """'a.b.c.d[/width]' → canonical network text; host bits are cleared as sshuttle does."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise UsageError(f"invalid subnet {text!r}: expected a.b.c.d[/width]") from None
    return str(network)


def parse_remote(text: str) -> Tuple[str, Optional[int]]:
    """'[user@]host[:port]' (IPv6 as [addr]:port) → (ssh destination, port or None)."""
    user, at, hostport = text.rpartition("@")
    if hostport.startswith("["):
        host, bracket, rest = hostport[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise UsageError(f"invalid remote {text!r}: expected [user@][ipv6]:port")
        port_text = rest[1:]
    elif hostport.count(":") == 1:
        host, _, port_text = hostport.partition(":")
    else:
        host, port_text = hostport, ""
    if not host or (at and not user):
        raise UsageError(f"invalid remote {text!r}: expected [user@]host[:port]")
    port = None
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise UsageError(f"invalid port in remote {text!r}")
        port = int(port_text)
    return (f"{user}@{host}" if at else host), port


def parse_listen(text: str) -> Tuple[str, int]:
    """'[ip:]port' → (ip, port); the default ip is 127.0.0.1."""
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"invalid listen address {text!r}: expected [ip:]port") from None
    if not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"invalid listen port in {text!r}")
    return host, int(port_text)


def parse_args(argv: Sequence[str]) -> Options:
    """Options from the command line; UsageError for a bad value, DocoptExit for bad syntax."""
    args = docopt(USAGE, argv=list(argv), version=f"shuttle-client {__version__}")
    destination, port = parse_remote(args["--remote"])
    try:
        ssh_cmd = tuple(shlex.split(args["--ssh-cmd"]))
    except ValueError as exc:
        raise UsageError(f"invalid --ssh-cmd: {exc}") from None
    if not ssh_cmd:
        raise UsageError("--ssh-cmd is empty")
    if args["--method"] != "nat":
        raise UsageError(f"unknown --method {args['--method']!r}: this version has nat")
    return Options(
        ssh_destination=destination,
        ssh_port=port,
        subnets=_networks(args["SUBNET"]),
        excludes=_networks(args["--exclude"]),
        listen=parse_listen(args["--listen"]),
        ssh_cmd=ssh_cmd,
        python=args["--python"],
        method=args["--method"],
        firewalld=args["--firewalld"],
        verbose=bool(args["--verbose"]),
    )


def _networks(texts: List[str]) -> Tuple[str, ...]:
    return tuple(dict.fromkeys(parse_subnet(text) for text in texts))


__all__ = ["USAGE", "DocoptExit", "Options", "UsageError", "parse_args"]

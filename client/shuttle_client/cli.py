"""The command line: docopt usage text, parsed into a checked Options value."""

import grp
import ipaddress
import math
import os
import pwd
import shlex
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from docopt import DocoptExit, docopt
from shuttle_local.netns import outer_uid
from shuttle_protocol.checks import MAX_NAMESERVERS, check_hostname
from shuttle_protocol.errors import LocalProtocolError
from shuttle_protocol.firewall_messages import ANY_OWNER, Target
from shuttle_protocol.stream_messages import MAX_LIST

from . import __version__, split_dns
from .fastpath import DEFAULT_CAP, TCP_MODES
from .resolvers import DNS_PORT, plain
from .targets import TargetError, parse_targets, read_target_file

USAGE = """\
shuttle-client: a transparent-proxy VPN over ssh.

Captures this user's TCP connections to SUBNETs (and, with --dns, DNS queries) and
carries them over one ssh session (or --streams of them) to the server, which makes them
from there. Firewall rules come from shuttle-firewalld.

Usage:
  shuttle-client [options] [-v]... -r HOST [-x SUBNET]... [-X FILE]... [-s FILE]...
                 [SUBNET...]
  shuttle-client -h | --help
  shuttle-client -V | --version

Arguments:
  SUBNET                   what to capture: a.b.c.d[/width][:port[-port]],
                           [v6addr][/width][:port[-port]], v6addr[/width], 0/0, ::/0,
                           or a host name (all its addresses, resolved at start).

Options:
  -r, --remote=HOST        ssh destination: [user@]host[:port].
  -x, --exclude=SUBNET     do not capture this (same syntax; repeatable).
  -X, --exclude-from=FILE  read excludes from FILE (whitespace-separated, # comments).
  -s, --subnets=FILE       read SUBNETs from FILE (same format).
  -l, --listen=ADDR        the local redirect listeners, [ip:]port[,[ip:]port]... (all
                           on one port); default: port 0 (any free port) on 127.0.0.1
                           and ::1. A wildcard ip (0.0.0.0, ::) also captures traffic
                           routed through this host (router use); an IPv6 one takes
                           IPv6 only: -l 0.0.0.0:P,[::]:P for both.
  --disable-ipv6           capture no IPv6: listen on 127.0.0.1 only and leave out the
                           IPv6 addresses of host names and of -N's routes.
  -e, --ssh-cmd=CMD        the ssh command, with its options [default: ssh].
  --python=PATH            python on the server (default: python3, or python where
                           the server has no python3).
  --method=METHOD          firewall method: auto, nft, nat or tproxy (TCP and UDP)
                           [default: auto].
  --user=USER              capture the traffic of this user (default: yourself).
  --group=GROUP            capture only traffic of this group (with no --user: of
                           anyone in it).
  --all-users              capture the traffic of every local user.
  --firewalld=PATH         firewalld's socket (default: /run/shuttle/firewalld.sock;
                           if nothing answers there, a private one is started with
                           sudo, which may ask for your password; -D: sudo -n).
  --namespace=NAME         run in the network namespace NAME (as `ip netns` names
                           it), ssh and the firewall rules too: root enters it
                           first; another user starts the client in it (sudo ip
                           netns exec NAME sudo -u USER shuttle-client ...).
  -D, --daemon             go to the background once ready (implies --syslog; the
                           working directory becomes /).
  --pidfile=PATH           write the client's pid to PATH while it runs (with -D, the
                           default is shuttle-client.pid in the current directory).
  --syslog                 also log to syslog (/dev/log).
  -N, --auto-nets          also capture the networks the server routes (its routing
                           table, less default, loopback and link-local routes).
  --dns                    capture DNS queries (UDP and TCP) to this host's resolvers
                           (resolv.conf's, and systemd-resolved's upstreams) and have
                           them answered from the server's side.
  --ns-hosts=IP[,IP]       capture DNS queries to these servers only (implies --dns).
  --to-ns=IP[:PORT]        with --dns: ask this server, from the server's side
                           (default: the first nameserver of the server's resolv.conf).
  --dns-domains=DOMAIN[,DOMAIN]  with --dns: only names in these domains are answered
                           from the server's side; other queries go on, unchanged, to
                           the resolver they were sent to (split DNS).
  -H, --auto-hosts         put host names from the server's side (its /etc/hosts and
                           neighbours) into this host's /etc/hosts while shuttle runs
                           (needs firewalld's "hosts" permission unless you are root).
  --seed-hosts=NAMES       with -H: also these names, resolved on the server
                           (comma-separated).
  --streams=N              spread connections over N ssh sessions to the server, each
                           with its own agent, for links where one ssh channel's window
                           limits throughput (1-16) [default: 1].
  --tcp=PATH               how captured TCP travels: ssh (ssh's own forwarding, as
                           ssh -L: the ssh running the agent is a ControlMaster; at
                           start a probe checks that the server forwards TCP, and the
                           client fails if not), agent (the agent's channels), or auto
                           (ssh where the probe passed, else the agent). With ssh and
                           auto, connections past --tcp-cap per stream, and any that
                           ssh fails to open, go through the agent [default: auto].
  --tcp-cap=N              open connections per stream that ssh carries itself
                           (1-10000) [default: 50].
  --no-shortcuts           do not give destinations that many connections reach a
                           forward of ssh's own (README, "Shortcuts").
  --no-reconnect           exit (status 1) when the tunnel is lost, instead of
                           reconnecting with backoff while the rules stay.
  --keepalive=SECONDS      ping the agent this often; a tunnel whose agent does not
                           answer within three pings is lost [default: 10].
  --wait-tunnel=SECONDS    while the tunnel is down, hold new connections this long,
                           then reset them [default: 30].
  --control=PATH           the control socket for scripts and `shuttle-client ctl`
                           (default: $XDG_RUNTIME_DIR/shuttle/control.sock).
  --socks=ADDR             also serve SOCKS5 (CONNECT, with names resolved on the
                           server's side, and UDP ASSOCIATE) on [ip:]port (default ip
                           127.0.0.1) through the tunnel. With no SUBNET, only the
                           proxies run: no firewall rules, no shuttle-firewalld.
  --socks-auth=FILE        SOCKS5 clients must give the username:password on FILE's
                           first line (FILE readable by you alone); needed for a
                           non-loopback --socks address.
  --http-proxy=ADDR        also serve an HTTP proxy (CONNECT, and http:// requests) on
                           [ip:]port (default ip 127.0.0.1), for https_proxy/http_proxy;
                           it listens on loopback addresses only.
  -v, --verbose            say more: the client's and the agent's debug lines; -vv
                           also ssh's own (ssh -v), -vvv ssh -vv.
  -h, --help               show this text.
  -V, --version            show the version.

Capturing other users' or routed traffic needs root or shuttle-firewalld's policy file.
A running client is driven with `shuttle-client ctl` (see shuttle-client ctl --help).
"""


class UsageError(Exception):
    """A mistake on the command line; the text says which argument and why."""


METHODS = ("auto", "nft", "nat", "tproxy")
LOOPBACKS = ("127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::")  # noqa: S104 (listening there is the router use case)
MAX_STREAMS = 16
DEFAULT_FIREWALLD = "/run/shuttle/firewalld.sock"
MAX_TCP_CAP = 10_000
DEFAULT_PIDFILE = "shuttle-client.pid"  # with -D, in the current directory (as sshuttle)
# sun_path holds 108 bytes, the last one a NUL; the events socket's path adds ".events".
MAX_CONTROL_PATH = 107 - len(".events")
MAX_NAMESPACE = 255  # a file name's longest


@dataclass(frozen=True)
class Options:
    """Everything the command line decides, checked."""

    ssh_destination: str
    ssh_port: Optional[int]
    subnets: Tuple[Target, ...]
    excludes: Tuple[Target, ...]
    listen: Tuple[Tuple[str, int], ...]
    ssh_cmd: Tuple[str, ...]
    python: Optional[str]  # None: python3, else python (upload.remote_command)
    method: str
    uid: int
    gid: int
    firewalld: str
    verbose: bool
    firewalld_named: bool = False  # --firewalld given: never start a private one
    streams: int = 1
    reconnect: bool = True
    keepalive: float = 10.0
    wait_tunnel: float = 30.0
    control: Optional[str] = None  # None: control_paths.default_control_path()
    auto_nets: bool = False
    dns: bool = False
    ns_hosts: Tuple[str, ...] = ()  # () with dns: this host's resolvers
    to_ns: Optional[Tuple[str, int]] = None  # None: the server's first nameserver
    dns_domains: Tuple[str, ...] = ()  # (): every captured query goes to the server's side
    auto_hosts: bool = False
    seed_hosts: Tuple[str, ...] = ()
    daemon: bool = False
    pidfile: Optional[str] = None  # absolute
    syslog: bool = False
    tcp: str = "auto"
    tcp_cap: int = DEFAULT_CAP
    shortcuts: bool = True
    disable_ipv6: bool = False
    socks: Optional[Tuple[str, int]] = None
    socks_auth: Optional[Tuple[bytes, bytes]] = None
    http_proxy: Optional[Tuple[str, int]] = None

    @property
    def captures(self) -> bool:
        """Something to capture with firewall rules (else only the proxies run)."""
        return bool(self.subnets) or self.auto_nets

    @property
    def forward(self) -> bool:
        """A listener on a wildcard address: capture routed traffic too."""
        return any(host in WILDCARDS for host, _ in self.listen)


def split_host_port(text: str) -> Tuple[str, str]:
    """'host', 'host:port', '[host]:port', '[host]' or a bare IPv6 address → (host, port text,
    "" if none); ValueError for a bracket that is not closed or not followed by :port."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("expected [ipv6]:port")
        return host, rest[1:]
    if text.count(":") == 1:
        host, _, port_text = text.partition(":")
        return host, port_text
    return text, ""


def parse_port(text: str) -> int:
    """A port number, 1-65535; ValueError if it is not one."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"invalid port {text!r}")
    return int(text)


def parse_remote(text: str) -> Tuple[str, Optional[int]]:
    """'[user@]host[:port]' (IPv6 as [addr]:port) → (ssh destination, port or None)."""
    user, at, hostport = text.rpartition("@")
    if ":" in user:
        raise UsageError(
            f"invalid remote {text[: text.index(':')]}:...@{hostport}: shuttle takes no "
            "password on the command line (anyone on this host can read it there); "
            "use an ssh key, or let ssh ask for the password"
        )
    try:
        host, port_text = split_host_port(hostport)
    except ValueError:
        raise UsageError(f"invalid remote {text!r}: expected [user@][ipv6]:port") from None
    if not host or (at and not user):
        raise UsageError(f"invalid remote {text!r}: expected [user@]host[:port]")
    try:
        port = parse_port(port_text) if port_text else None
    except ValueError:
        raise UsageError(f"invalid port in remote {text!r}") from None
    return (f"{user}@{host}" if at else host), port


def parse_address_port(text: str, default_port: int) -> Tuple[str, int]:
    """'IP', 'IP:PORT', '[IPv6]:PORT' or a bare IPv6 address → (canonical IP, port).

    ValueError with a message for the user if it is none of those.
    """
    try:
        host, port_text = split_host_port(text)
    except ValueError:
        raise ValueError(f"{text!r} is not IP[:PORT]") from None
    try:
        address = plain(host)
    except ValueError:
        raise ValueError(f"{text!r} is not IP[:PORT]: {host!r} is not an IP address") from None
    try:
        return address, parse_port(port_text) if port_text else default_port
    except ValueError:
        raise ValueError(f"{text!r} has an invalid port") from None


def parse_addresses(words: Sequence[str]) -> Tuple[str, ...]:
    """Comma-separated IP addresses → canonical addresses, once each; ValueError if bad."""
    found: List[str] = []
    for word in words:
        for item in filter(None, (part.strip() for part in word.split(","))):
            if "%" in item:
                raise ValueError(f"{item!r}: an address with a zone cannot be captured")
            try:
                address = plain(item)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address") from None
            if address not in found:
                found.append(address)
    if len(found) > MAX_NAMESERVERS:
        raise ValueError(f"at most {MAX_NAMESERVERS} nameservers")
    return tuple(found)


def parse_listen(text: Optional[str], disable_ipv6: bool = False) -> Tuple[Tuple[str, int], ...]:
    """'[ip:]port[,[ip:]port]...' (sshuttle's -l) → the listeners' (ip, port), once each;
    an item without an ip stands for 127.0.0.1 and ::1 (127.0.0.1 alone with disable_ipv6).
    All share one port: firewalld redirects to one."""
    loopbacks = LOOPBACKS[:1] if disable_ipv6 else LOOPBACKS
    listen: List[Tuple[str, int]] = []
    for item in (text or "0").split(","):
        host, _, port_text = item.strip().rpartition(":")
        host = host.strip("[]")
        if host:
            try:
                host = plain(host)
            except ValueError:
                raise UsageError(f"invalid listen address {item!r}: expected [ip:]port") from None
        if not port_text.isdigit() or int(port_text) > 65535:
            raise UsageError(f"invalid listen port in {item!r}")
        if disable_ipv6 and ":" in host:
            raise UsageError(f"-l {item}: an IPv6 address, but --disable-ipv6 is given")
        for ip in (host,) if host else loopbacks:
            if (ip, int(port_text)) not in listen:
                listen.append((ip, int(port_text)))
    if len({port for _, port in listen}) > 1:
        raise UsageError(
            f"-l {text}: every listen address takes the same port (the rules "
            "redirect to one port); use one port, or 0 everywhere for any free one"
        )
    return tuple(listen)


def drop_ipv6(targets: Sequence[Target]) -> Tuple[Target, ...]:
    """The IPv4 ones of targets (--disable-ipv6)."""
    return tuple(t for t in targets if ipaddress.ip_network(t[0]).version == 4)


def verbose_ssh(ssh_cmd: Tuple[str, ...], count: int) -> Tuple[str, ...]:
    """ssh_cmd with ssh's own -v for each -v past the first (-vv: ssh -v), at most -vvv."""
    extra = min(count - 1, 3)
    return (*ssh_cmd, "-" + "v" * extra) if extra > 0 else ssh_cmd


def check_listen_families(
    listen: Sequence[Tuple[str, int]], subnets: Sequence[Target], nameservers: Sequence[str]
) -> None:
    """UsageError if something captured is of an IP version no listen address takes.

    The client's IPv6 listeners are IPV6_V6ONLY (proxy.make_listener), so -l [::]:P takes
    no IPv4: firewalld would refuse the session, as anyone could bind 0.0.0.0:P beside it.
    """
    versions = {ipaddress.ip_network(network).version: network for network, _, _ in subnets}
    for address in nameservers:
        versions.setdefault(ipaddress.ip_address(address).version, address)
    listening = {ipaddress.ip_address(host).version for host, _ in listen}
    for version in sorted(versions.keys() - listening):
        host, port = listen[0]
        given = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        other = "0.0.0.0" if version == 4 else "[::]"  # noqa: S104 (an example, not bound)
        raise UsageError(
            f"-l {given} listens for IPv{6 if version == 4 else 4} only (the client's IPv6 "
            f"listeners are IPV6_V6ONLY), but IPv{version} is captured "
            f"({versions[version]}): use -l {other}:{port} for IPv{version}, or no -l for both "
            "on the loopback addresses"
        )


def parse_streams(text: str) -> int:
    """--streams: how many ssh sessions, 1 to MAX_STREAMS."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_STREAMS:
        raise UsageError(f"invalid --streams {text!r}: expected a number from 1 to {MAX_STREAMS}")
    return int(text)


def parse_tcp(mode: str, cap: str) -> Tuple[str, int]:
    """--tcp and --tcp-cap."""
    if mode not in TCP_MODES:
        raise UsageError(f"invalid --tcp {mode!r}: choose {', '.join(TCP_MODES)}")
    if not cap.isdigit() or not 1 <= int(cap) <= MAX_TCP_CAP:
        raise UsageError(f"invalid --tcp-cap {cap!r}: expected a number from 1 to {MAX_TCP_CAP}")
    return mode, int(cap)


def parse_seconds(name: str, text: str, low: float, high: float) -> float:
    """A number of seconds in [low, high] for option name; UsageError if it is not one."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # also false for nan
        raise UsageError(f"invalid {name} {text!r}: expected seconds from {low:g} to {high:g}")
    return value


def parse_control(text: Optional[str]) -> Optional[str]:
    """--control: an absolute path that fits a unix socket address (with ".events" added)."""
    if text is None:
        return None
    if not os.path.isabs(text) or len(os.fsencode(text)) > MAX_CONTROL_PATH:
        raise UsageError(f"--control must be an absolute path of at most {MAX_CONTROL_PATH} bytes")
    return text


def parse_dns(
    dns: bool, ns_hosts: Optional[str], to_ns: Optional[str]
) -> Tuple[bool, Tuple[str, ...], Optional[Tuple[str, int]]]:
    """--dns, --ns-hosts and --to-ns → (capture DNS?, servers to capture, where to ask)."""
    servers: Tuple[str, ...] = ()
    if ns_hosts is not None:
        try:
            servers = parse_addresses([ns_hosts])
        except ValueError as exc:
            raise UsageError(f"invalid --ns-hosts: {exc}") from None
        if not servers:
            raise UsageError("--ns-hosts is empty")
    capture = dns or bool(servers)
    if to_ns is None:
        return capture, servers, None
    if not capture:
        raise UsageError("--to-ns needs --dns or --ns-hosts")
    try:
        return capture, servers, parse_address_port(to_ns, DNS_PORT)
    except ValueError as exc:
        raise UsageError(f"invalid --to-ns: {exc}") from None


def parse_dns_domains(text: Optional[str], dns: bool) -> Tuple[str, ...]:
    """--dns-domains → the domains, each as DNS writes it (lower case, no final dot)."""
    if text is None:
        return ()
    if not dns:
        raise UsageError("--dns-domains needs --dns or --ns-hosts")
    try:
        return split_dns.parse_domains(text)
    except ValueError as exc:
        raise UsageError(f"invalid --dns-domains: {exc}") from None


def parse_pidfile(text: Optional[str], daemon: bool) -> Optional[str]:
    """--pidfile as an absolute path (a daemon works in /); with -D, a default."""
    if text is None and not daemon:
        return None
    if text == "":
        raise UsageError("--pidfile is empty")
    return os.path.abspath(text or DEFAULT_PIDFILE)


def parse_seed_hosts(text: Optional[str]) -> Tuple[str, ...]:
    """--seed-hosts: comma-separated host names, each valid."""
    names = tuple(dict.fromkeys(filter(None, (n.strip() for n in (text or "").split(",")))))
    if text is not None and not names:
        raise UsageError("--seed-hosts is empty")
    if len(names) > MAX_LIST:
        raise UsageError(f"--seed-hosts takes at most {MAX_LIST} names")
    for name in names:
        try:
            check_hostname(name, "--seed-hosts")
        except LocalProtocolError as exc:
            raise UsageError(str(exc)) from None
    return names


def parse_namespace(name: Optional[str]) -> Optional[str]:
    """--namespace: a name `ip netns` could have given, a file of its directory (main()
    enters it before the rest of the command line is parsed, argfiles.named_namespace)."""
    if name is None:
        return None
    if name in ("", ".", "..") or "/" in name or "\0" in name or len(name) > MAX_NAMESPACE:
        raise UsageError(f"invalid --namespace {name!r}: expected a name from `ip netns list`")
    return name


def parse_owner(user: Optional[str], group: Optional[str], all_users: bool) -> Tuple[int, int]:
    """(uid, gid) whose traffic to capture; ANY_OWNER where it does not matter."""
    if all_users and user:
        raise UsageError("--all-users and --user exclude each other")
    gid = ANY_OWNER if group is None else _lookup(group, grp.getgrnam, "group")
    if all_users or (group is not None and user is None):
        return ANY_OWNER, gid
    # Ourselves as firewalld sees us, also from inside a user namespace (unshare -r).
    uid = outer_uid() if user is None else _lookup(user, pwd.getpwnam, "user")
    return uid, gid


def _lookup(name: str, by_name: Callable[[str], Any], kind: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return int(by_name(name)[2])
    except KeyError:
        raise UsageError(f"no such {kind}: {name!r}") from None


def parse_args(argv: Sequence[str]) -> Options:
    """Options from the command line; UsageError for a bad value, DocoptExit for bad syntax."""
    args = _docopt(argv)
    destination, port = parse_remote(args["--remote"])
    try:
        ssh_cmd = verbose_ssh(tuple(shlex.split(args["--ssh-cmd"])), args["--verbose"])
    except ValueError as exc:
        raise UsageError(f"invalid --ssh-cmd: {exc}") from None
    if not ssh_cmd:
        raise UsageError("--ssh-cmd is empty")
    if args["--method"] not in METHODS:
        raise UsageError(f"invalid --method {args['--method']!r}: choose {', '.join(METHODS)}")
    uid, gid = parse_owner(args["--user"], args["--group"], args["--all-users"])
    try:
        subnets = parse_targets(_with_files(args["SUBNET"], args["--subnets"]))
        excludes = parse_targets(_with_files(args["--exclude"], args["--exclude-from"]))
    except TargetError as exc:
        raise UsageError(str(exc)) from None
    disable_ipv6 = bool(args["--disable-ipv6"])
    if disable_ipv6:
        given = bool(subnets)
        subnets, excludes = drop_ipv6(subnets), drop_ipv6(excludes)
        if given and not subnets:
            raise UsageError("nothing to capture: every SUBNET is IPv6 (--disable-ipv6)")
    socks, socks_auth, http_proxy = parse_proxies(
        args["--socks"], args["--socks-auth"], args["--http-proxy"]
    )
    if not subnets and not args["--auto-nets"] and not (socks or http_proxy):
        raise UsageError("nothing to capture: give a SUBNET, -s FILE, -N, --socks or --http-proxy")
    if (args["--dns"] or args["--auto-hosts"]) and not subnets and not args["--auto-nets"]:
        raise UsageError("--dns and -H capture with firewall rules: give a SUBNET or -N too")
    tcp, tcp_cap = parse_tcp(args["--tcp"], args["--tcp-cap"])
    dns, ns_hosts, to_ns = parse_dns(args["--dns"], args["--ns-hosts"], args["--to-ns"])
    if args["--seed-hosts"] is not None and not args["--auto-hosts"]:
        raise UsageError("--seed-hosts needs -H (--auto-hosts)")
    if disable_ipv6 and any(":" in address for address in ns_hosts):
        raise UsageError("--ns-hosts has an IPv6 address, but --disable-ipv6 is given")
    listen = parse_listen(args["--listen"], disable_ipv6)
    if args["--method"] != "tproxy":  # tproxy: firewalld makes the listeners
        check_listen_families(listen, subnets, ns_hosts)
    return Options(
        ssh_destination=destination,
        ssh_port=port,
        subnets=subnets,
        excludes=excludes,
        listen=listen,
        ssh_cmd=ssh_cmd,
        python=args["--python"],
        method=args["--method"],
        uid=uid,
        gid=gid,
        firewalld=args["--firewalld"] or DEFAULT_FIREWALLD,
        firewalld_named=args["--firewalld"] is not None,
        verbose=args["--verbose"] > 0,
        streams=parse_streams(args["--streams"]),
        reconnect=not args["--no-reconnect"],
        keepalive=parse_seconds("--keepalive", args["--keepalive"], 0.1, 3600),
        wait_tunnel=parse_seconds("--wait-tunnel", args["--wait-tunnel"], 0, 3600),
        control=parse_control(args["--control"]),
        auto_nets=bool(args["--auto-nets"]),
        dns=dns,
        ns_hosts=ns_hosts,
        to_ns=to_ns,
        dns_domains=parse_dns_domains(args["--dns-domains"], dns),
        auto_hosts=bool(args["--auto-hosts"]),
        seed_hosts=parse_seed_hosts(args["--seed-hosts"]),
        daemon=bool(args["--daemon"]),
        pidfile=parse_pidfile(args["--pidfile"], bool(args["--daemon"])),
        syslog=bool(args["--syslog"] or args["--daemon"]),
        tcp=tcp,
        tcp_cap=tcp_cap,
        shortcuts=not args["--no-shortcuts"],
        disable_ipv6=disable_ipv6,
        socks=socks,
        socks_auth=socks_auth,
        http_proxy=http_proxy,
    )


def _docopt(argv: Sequence[str]) -> Dict[str, Any]:
    """docopt's parse; a forgotten -r is one line, not docopt's "unmatched arguments"."""
    version = f"shuttle-client {__version__}"
    try:
        return dict(docopt(USAGE, argv=list(argv), version=version))
    except DocoptExit as exc:
        mistake = exc
    # The same usage with -r optional: if that parses, the one mistake is the missing -r.
    relaxed = USAGE.replace(" -r HOST ", " [-r HOST] ", 1)
    try:
        args = docopt(relaxed, argv=list(argv), version=version)
    except DocoptExit:
        raise mistake from None  # another mistake: docopt's text, of the real usage
    if args["--remote"] is None:
        raise UsageError(
            "no -r HOST: which ssh server to go through? e.g. shuttle-client -r "
            "[user@]host[:port] 10.0.0.0/8"
        )
    raise mistake


# -- the proxies (--socks, --socks-auth, --http-proxy) --------------------------------------

MAX_CREDENTIAL = 255  # RFC 1929: one length byte each


def parse_proxy_address(text: str, name: str) -> Tuple[str, int]:
    """'PORT', 'IP:PORT' or '[IPv6]:PORT' → (canonical IP, port); port 0: any free one."""
    host, port_text = ("127.0.0.1", text) if text.isdigit() else ("", "")
    if not host:
        try:
            host, port_text = split_host_port(text)
            host = plain(host)
        except ValueError:
            raise UsageError(f"invalid {name} {text!r}: expected [ip:]port") from None
    if not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"invalid {name} {text!r}: expected [ip:]port")
    return host, int(port_text)


def read_socks_auth(path: str) -> Tuple[bytes, bytes]:
    """--socks-auth: username:password on the first line of a file only its owner reads."""
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_mode & 0o077:
                raise UsageError(f"--socks-auth {path}: others may read it (chmod 600 {path})")
            line = file.readline(2 * MAX_CREDENTIAL + 3).rstrip(b"\r\n")
    except OSError as exc:
        raise UsageError(f"--socks-auth {path}: {exc.strerror}") from None
    user, colon, password = line.partition(b":")
    if not colon or not 0 < len(user) <= MAX_CREDENTIAL or not 0 < len(password) <= MAX_CREDENTIAL:
        raise UsageError(
            f"--socks-auth {path}: the first line must be username:password "
            f"(each 1-{MAX_CREDENTIAL} bytes)"
        )
    return user, password


def parse_proxies(
    socks_text: Optional[str], auth_path: Optional[str], http_text: Optional[str]
) -> Tuple[Optional[Tuple[str, int]], Optional[Tuple[bytes, bytes]], Optional[Tuple[str, int]]]:
    """--socks, --socks-auth, --http-proxy. Anyone who can reach a proxy can use the
    tunnel: off loopback, SOCKS needs a password, and the HTTP proxy (which has none) may
    not go there."""
    socks = None if socks_text is None else parse_proxy_address(socks_text, "--socks")
    http = None if http_text is None else parse_proxy_address(http_text, "--http-proxy")
    if auth_path is not None and socks is None:
        raise UsageError("--socks-auth needs --socks")
    auth = None if auth_path is None else read_socks_auth(auth_path)
    if socks is not None and auth is None and not ipaddress.ip_address(socks[0]).is_loopback:
        raise UsageError(
            f"--socks {socks_text} is not a loopback address: anyone who reaches it could "
            "use the tunnel, so it needs --socks-auth FILE"
        )
    if http is not None and not ipaddress.ip_address(http[0]).is_loopback:
        raise UsageError(
            f"--http-proxy {http_text} is not a loopback address: the HTTP proxy has no "
            "password, so it listens on loopback only (use --socks with --socks-auth)"
        )
    return socks, auth, http


def _with_files(words: List[str], paths: List[str]) -> List[str]:
    return [*words, *(word for path in paths for word in read_target_file(path))]


__all__ = ["USAGE", "DocoptExit", "Options", "UsageError", "parse_args"]

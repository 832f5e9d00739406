"""The agent's answer to GetHosts: host names on the server's side, sent as they are found.

Three sources, in this order: the server's /etc/hosts; the request's seed names, resolved
on the server (the names the user asked for come before those found by chance); reverse
DNS of the server's IPv4 neighbours, from /proc/net/arp. IPv6 neighbours are not looked
up: the kernel lists them only over netlink (RTM_GETNEIGH), in no /proc file.

Names are lowercased (DNS names are case-insensitive, and the client deduplicates text)
and lose a trailing dot; names the protocol refuses, and localhost names, are skipped. So
are addresses that would mean something else on the client's machine: loopback,
link-local, unspecified, multicast, and IPv4's reserved 240.0.0.0/4 with the broadcast
address.

Resolver calls block, so each runs in a thread, a few at a time, and is given up after a
timeout; the event loop relays on meanwhile. They are daemon threads, not an executor's:
Python joins a ThreadPoolExecutor's threads at exit, so a lookup stuck in the resolver
would keep the agent alive after its session ended.
"""

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import re
import socket
import threading
from collections import deque
from typing import Callable, Deque, Iterable, Iterator, List, Optional, Set, Tuple, TypeVar

from shuttle_protocol.checks import check_hostname
from shuttle_protocol.errors import LocalProtocolError
from shuttle_protocol.schema import Message
from shuttle_protocol.stream_messages import MAX_HOST_ENTRIES, MAX_LIST, Hosts

log = logging.getLogger("shuttle")

Entry = Tuple[str, str]  # (host name, address)
Lookup = Callable[[str], List[Entry]]
T = TypeVar("T")

HOSTS_FILE = "/etc/hosts"
ARP_FILE = "/proc/net/arp"
# Neighbours looked up per request: a router on a big LAN may have thousands.
MAX_NEIGHBOURS = 256
# Resolver calls at once. Each blocks a thread, and a few keep the nameservers unflooded.
LOOKUP_WORKERS = 4
# glibc's resolver tries each nameserver for 5 s, twice: a slower answer is not waited for.
LOOKUP_TIMEOUT = 10.0
# GetHosts requests held while one is served; beyond that a client is repeating itself.
MAX_PENDING = 4

# /proc/net/arp's flag of a complete entry (the neighbour answered, or is permanent).
ATF_COM = 0x02
_ARP_FLAGS = re.compile(r"0x[0-9A-Fa-f]{1,8}")

# What Debian's and Red Hat's /etc/hosts call their loopback and multicast addresses.
LOCALHOST_NAMES = frozenset(
    (
        "localhost",
        "localhost.localdomain",
        "localhost4",
        "localhost4.localdomain4",
        "localhost6",
        "localhost6.localdomain6",
        "ip6-localhost",
        "ip6-loopback",
        "ip6-localnet",
        "ip6-mcastprefix",
        "ip6-allnodes",
        "ip6-allrouters",
        "ip6-allhosts",
    )
)


def host_name(text: str) -> Optional[str]:
    """text as the client's /etc/hosts may hold it (lowercase, no trailing dot), or None for
    a localhost name or one the protocol refuses."""
    if not text.isascii():  # before lower(): the Kelvin sign would become an ASCII "k"
        return None
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    # RFC 6761: every name under .localhost is loopback.
    if name in LOCALHOST_NAMES or name.endswith(".localhost"):
        return None
    try:
        check_hostname(name, "host name")
    except LocalProtocolError:
        return None
    return name


def host_address(text: str) -> Optional[str]:
    """text as a canonical address, or None if it does not parse, has a scope id, or would
    mean another machine (or none) on the client's side."""
    if "%" in text:  # a scope id names one of the server's interfaces
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # ::ffff:127.0.0.1 is loopback too, which Python before 3.13 does not see; and 3.13
        # writes mapped addresses differently, which a client on another version would refuse.
        address = address.ipv4_mapped
    if (
        address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or (address.version == 4 and address.is_reserved)
    ):
        return None
    return str(address)


def usable(name: str, address: str) -> Optional[Entry]:
    """The pair as it is sent, or None if either part is skipped."""
    usable_name, usable_address = host_name(name), host_address(address)
    if usable_name is None or usable_address is None:
        return None
    return usable_name, usable_address


def parse_hosts(lines: Iterable[str]) -> Iterator[Entry]:
    """The usable (name, address) pairs of /etc/hosts lines, in order: each line is an
    address, its canonical name and aliases, and maybe a # comment."""
    for line in lines:
        fields = line.split("#", 1)[0].split()
        for name in fields[1:]:
            entry = usable(name, fields[0])
            if entry is not None:
                yield entry


def parse_arp(lines: Iterable[str]) -> Iterator[str]:
    """The usable addresses of the complete entries of /proc/net/arp, in order; the header,
    incomplete entries and malformed lines skipped.

    Columns: IP address, HW type, Flags, HW address, Mask, Device.
    """
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or not _ARP_FLAGS.fullmatch(fields[2]):
            continue
        if not int(fields[2], 16) & ATF_COM:
            continue
        address = host_address(fields[0])
        if address is not None:
            yield address


def reverse_lookup(address: str) -> List[Entry]:
    """The usable names of address by reverse lookup (gethostbyaddr: /etc/hosts, then DNS, as
    nsswitch.conf says). Blocks."""
    name, aliases, _ = socket.gethostbyaddr(address)
    entries = (usable(each, address) for each in (name, *aliases))
    return [entry for entry in entries if entry is not None]


def forward_lookup(name: str) -> List[Entry]:
    """The usable addresses of name, IPv4 and IPv6 (getaddrinfo). Blocks."""
    infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    entries = (
        usable(name, str(info[4][0]))
        for info in infos
        if info[0] in (socket.AF_INET, socket.AF_INET6)
    )
    return [entry for entry in entries if entry is not None]


def _read(path: str, parse: Callable[[Iterable[str]], Iterator[T]], limit: int) -> List[T]:
    """The first limit items parse finds in a file, read no further than needed."""
    with open(path, encoding="utf-8", errors="replace") as lines:
        return list(itertools.islice(parse(lines), limit))


class Lookups:
    """Blocking lookups in daemon threads: at most `workers` threads at a time, and a caller
    waits at most `timeout` for an answer."""

    def __init__(self, workers: int = LOOKUP_WORKERS, timeout: float = LOOKUP_TIMEOUT) -> None:
        self.workers = workers
        self.timeout = timeout
        self._slots = asyncio.Semaphore(workers)

    async def run(self, lookup: Lookup, argument: str) -> List[Entry]:
        """lookup(argument) in a thread; nothing if it fails or does not answer in time."""
        loop = asyncio.get_running_loop()
        await self._slots.acquire()
        answer: asyncio.Future[List[Entry]] = loop.create_future()

        def finished(entries: List[Entry]) -> None:
            # The slot is freed when the thread ends, not when its caller gives up on it:
            # lookups stuck in the resolver cannot pile up threads.
            self._slots.release()
            if not answer.done():
                answer.set_result(entries)

        def work() -> None:
            entries: List[Entry] = []
            try:
                entries = lookup(argument)
            # UnicodeError: a name the resolver cannot encode (a label over 63 characters).
            except (OSError, UnicodeError) as exc:
                log.debug("no host names from %s: %s", argument, exc)
            finally:
                # A closed loop means the session is over: nobody waits for the answer.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(finished, entries)

        try:
            threading.Thread(target=work, name="shuttle-lookup", daemon=True).start()
        except RuntimeError as exc:  # the system has no thread to spare
            self._slots.release()
            log.debug("no host names from %s: %s", argument, exc)
            return []
        try:
            return await asyncio.wait_for(answer, self.timeout)
        except asyncio.TimeoutError:
            log.debug("no host names from %s: no answer in %g s", argument, self.timeout)
            return []


class HostFinder:
    """The agent's answer to GetHosts: serves the requests one after another, each pair at
    most once per session and max_entries in all, until the session ends."""

    def __init__(
        self,
        send: Callable[[Message], None],
        lookups: Optional[Lookups] = None,
        hosts_file: str = HOSTS_FILE,
        arp_file: str = ARP_FILE,
        max_entries: int = MAX_HOST_ENTRIES,
    ) -> None:
        self.send = send
        self.lookups = lookups or Lookups()
        self.hosts_file = hosts_file
        self.arp_file = arp_file
        self.max_entries = max_entries
        self.full = False  # max_entries reached: nothing more is looked for
        # The task serving the requests, while there are any.
        self.serving: Optional[asyncio.Task[None]] = None
        self._seen: Set[Entry] = set()
        self._pending: Deque[Tuple[str, ...]] = deque()
        self._ignored = 0  # requests dropped because too many were waiting
        self._closed = False

    def request(self, seeds: Tuple[str, ...]) -> None:
        """Answer a GetHosts with these seeds, after the requests already waiting."""
        if self._closed or self.full:
            return
        if len(self._pending) >= MAX_PENDING:
            # Said once: a client repeating itself must not flood the user's terminal.
            level = logging.DEBUG if self._ignored else logging.WARNING
            self._ignored += 1
            log.log(level, "GetHosts ignored: %d requests are waiting already", MAX_PENDING)
            return
        self._pending.append(seeds)
        if self.serving is None:
            self.serving = asyncio.get_running_loop().create_task(self._serve())

    def close(self) -> None:
        """The session is over: stop looking, send nothing more."""
        self._closed = True
        self._pending.clear()
        if self.serving is not None:
            self.serving.cancel()

    async def _serve(self) -> None:
        try:
            while self._pending and not self.full:
                await self._discover(self._pending.popleft())
        finally:
            self.serving = None

    async def _discover(self, seeds: Tuple[str, ...]) -> None:
        loop = asyncio.get_running_loop()
        # Files in the default executor: a big /etc/hosts must not stall the relaying either.
        try:
            found = await loop.run_in_executor(
                None, _read, self.hosts_file, parse_hosts, self.max_entries
            )
        except OSError as exc:
            log.info("cannot read the host names in %s: %s", self.hosts_file, exc.strerror or exc)
        else:
            self._add(found)
        neighbours: List[str] = []
        try:
            neighbours = await loop.run_in_executor(
                None, _read, self.arp_file, parse_arp, MAX_NEIGHBOURS
            )
        except OSError as exc:
            log.info("cannot read the neighbours in %s: %s", self.arp_file, exc.strerror or exc)
        names = dict.fromkeys(name for name in map(host_name, seeds) if name is not None)
        jobs = itertools.chain(
            ((forward_lookup, name) for name in names),
            ((reverse_lookup, address) for address in dict.fromkeys(neighbours)),
        )
        # Workers share one iterator, so each job is done once, in order, a few at a time.
        await asyncio.gather(*(self._work(jobs) for _ in range(self.lookups.workers)))

    async def _work(self, jobs: Iterator[Tuple[Lookup, str]]) -> None:
        for lookup, argument in jobs:
            if self.full:
                return
            self._add(await self.lookups.run(lookup, argument))

    def _add(self, entries: Iterable[Entry]) -> None:
        """Send the pairs not sent before, MAX_LIST per message, up to max_entries in all."""
        if self.full:  # a lookup that was under way when the last pair fitted
            return
        new: List[Entry] = []
        for entry in entries:
            if entry in self._seen:
                continue
            self._seen.add(entry)
            new.append(entry)
            if len(self._seen) >= self.max_entries:
                log.warning(
                    "%d host names sent, as many as a session may: no more are looked for",
                    self.max_entries,
                )
                self.full = True
                break
        for start in range(0, len(new), MAX_LIST):
            self.send(Hosts(tuple(new[start : start + MAX_LIST])))

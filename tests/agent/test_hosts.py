"""GetHosts: parsing /etc/hosts and /proc/net/arp, the discovery in-process against a fake
resolver, and the agent's answer from a namespace with its own /etc/hosts, neighbours and
nameserver (a small DNS server the test runs there)."""

import asyncio
import contextlib
import json
import logging
import select
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any, Coroutine, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import pytest
from shuttle_agent.hosts import (
    LOOKUP_WORKERS,
    MAX_PENDING,
    HostFinder,
    Lookups,
    host_address,
    host_name,
    parse_arp,
    parse_hosts,
)
from shuttle_protocol.schema import Message
from shuttle_protocol.stream_messages import MAX_LIST, Error, GetHosts, Hosts, Ping, Pong

from .agent_process import PYTHONS, STUCK, AgentProcess, Namespace, StartAgent, welcomed

Entry = Tuple[str, str]

# Debian's default, a few of the server's own names, and what a hosts file also holds.
ETC_HOSTS = """\
127.0.0.1\tlocalhost
127.0.1.1\tagenthost.corp.example\tagenthost

# The following lines are desirable for IPv6 capable hosts
::1     localhost ip6-localhost ip6-loopback
ff02::1 ip6-allnodes
ff02::2 ip6-allrouters

10.9.0.20\tDB1.corp.example. db1   # the database
2001:db8:9::20\tdb1.corp.example
10.9.0.21\tunder_score ok-name 10.9.0.22
#10.9.0.23\tcommented.corp.example
169.254.9.9\tlinklocal.corp.example
fe80::9%v0\tscoped.corp.example
0.0.0.0\tads.example
10.9.0.24
::ffff:10.9.0.25\tmapped.corp.example
10.9.0.26\tdev.localhost
not-an-address\tnamed.corp.example
"""
HOSTS_ENTRIES = [
    ("db1.corp.example", "10.9.0.20"),
    ("db1", "10.9.0.20"),
    ("db1.corp.example", "2001:db8:9::20"),
    ("ok-name", "10.9.0.21"),
    ("mapped.corp.example", "10.9.0.25"),
]

PROC_NET_ARP = """\
IP address       HW type     Flags       HW address            Mask     Device
10.9.0.5         0x1         0x2         02:00:00:00:00:05     *        v0
10.9.0.6         0x1         0x6         02:00:00:00:00:06     *        v0
10.9.0.7         0x1         0x0         00:00:00:00:00:00     *        v0
169.254.0.1      0x1         0x2         02:00:00:00:00:08     *        v0
10.9.0.9         0x1         2           02:00:00:00:00:09     *        v0
10.9.0.10        0x1         0x2
10.9.0.5         0x1         0x2         02:00:00:00:00:05     *        v1
"""


def test_etc_hosts_gives_the_usable_pairs_in_order() -> None:
    assert list(parse_hosts(ETC_HOSTS.splitlines())) == HOSTS_ENTRIES


def test_arp_gives_the_complete_entries_in_order() -> None:
    # Incomplete (0x0), link-local, a flag not in hex and a short line are skipped; the
    # same neighbour on two devices comes twice (the discovery looks it up once).
    assert list(parse_arp(PROC_NET_ARP.splitlines())) == ["10.9.0.5", "10.9.0.6", "10.9.0.5"]


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("ok-name", "ok-name"),
        ("DB1.Corp.Example.", "db1.corp.example"),
        ("localhost", None),
        ("LocalHost.LocalDomain", None),
        ("ip6-allnodes", None),
        ("app.localhost", None),
        ("under_score", None),
        ("10.1.2.3", None),
        ("a" * 64 + ".example", None),
        ("\u212aelvin", None),  # the Kelvin sign, which lower() turns into an ASCII k
        ("", None),
        ("-lead.example", None),
    ],
)
def test_host_names(text: str, name: Optional[str]) -> None:
    assert host_name(text) == name


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("2001:DB8::0005", "2001:db8::5"),
        ("64:ff9b::a01:203", "64:ff9b::a01:203"),  # NAT64 is an ordinary address here
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("::ffff:127.0.0.1", None),
        ("127.0.1.1", None),
        ("::1", None),
        ("169.254.1.1", None),
        ("fe80::1", None),
        ("fe80::1%eth0", None),
        ("0.0.0.0", None),
        ("::", None),
        ("224.0.0.251", None),
        ("ff02::fb", None),
        ("255.255.255.255", None),
        ("240.0.0.1", None),
        ("10.1.2", None),
        ("host", None),
    ],
)
def test_host_addresses(text: str, address: Optional[str]) -> None:
    assert host_address(text) == address


# -- the discovery, in-process ----------------------------------------------------------------


class FakeResolver:
    """Stands in for gethostbyaddr and getaddrinfo: answers from tables, counts the calls
    under way, and holds the lookups of `hang` until released."""

    def __init__(self) -> None:
        self.names: Dict[str, List[str]] = {}  # address -> its names, the canonical one first
        self.addresses: Dict[str, List[str]] = {}  # name -> its addresses
        self.hang: Set[str] = set()
        self.released = threading.Event()
        self.calls: List[str] = []
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _call(self, argument: str) -> Iterator[None]:
        with self._lock:
            self.calls.append(argument)
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            if argument in self.hang:
                self.released.wait(STUCK)
            yield
        finally:
            with self._lock:
                self.running -= 1

    def gethostbyaddr(self, address: str) -> Tuple[str, List[str], List[str]]:
        with self._call(address):
            if address not in self.names:
                raise socket.herror(1, "Unknown host")
            first, *aliases = self.names[address]
            return first, aliases, [address]

    def getaddrinfo(self, name: str, port: Any, **_: Any) -> List[Tuple[Any, ...]]:
        with self._call(name):
            if name == "raises.unicode.example":
                raise UnicodeError("label too long")
            if name not in self.addresses:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, 0, 0, 0))
                if ":" in a
                else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0))
                for a in self.addresses[name]
            ]


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeResolver]:
    fake = FakeResolver()
    monkeypatch.setattr(socket, "gethostbyaddr", fake.gethostbyaddr)
    monkeypatch.setattr(socket, "getaddrinfo", fake.getaddrinfo)
    yield fake
    fake.released.set()  # no thread of the test outlives it


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, STUCK))


async def served(finder: HostFinder) -> None:
    """Wait until the finder has served every request it took."""
    while finder.serving is not None:
        await asyncio.sleep(0.01)


async def threads_ended() -> None:
    """Wait until every lookup thread has ended, and its answer has reached the loop."""
    while any(thread.name == "shuttle-lookup" for thread in threading.enumerate()):
        await asyncio.sleep(0.01)
    # A thread hands its answer over (call_soon_threadsafe) before it ends; one turn of the
    # loop runs it.
    await asyncio.sleep(0)
    await asyncio.sleep(0)


class Session:
    """A HostFinder on files of the test's, and what it sent."""

    def __init__(self, tmp_path: Path, etc_hosts: str = "", arp: str = "", **options: Any) -> None:
        (tmp_path / "hosts").write_text(etc_hosts)
        (tmp_path / "arp").write_text(arp)
        self.sent: List[Message] = []
        self.finder = HostFinder(
            self.sent.append,
            hosts_file=str(tmp_path / "hosts"),
            arp_file=str(tmp_path / "arp"),
            **options,
        )

    @property
    def messages(self) -> List[Hosts]:
        hosts_messages = [msg for msg in self.sent if isinstance(msg, Hosts)]
        assert len(hosts_messages) == len(self.sent)
        return hosts_messages

    @property
    def entries(self) -> List[Entry]:
        return [entry for msg in self.messages for entry in msg.entries]

    async def until(self, wanted: Sequence[Entry]) -> None:
        while not set(wanted) <= set(self.entries):
            await asyncio.sleep(0.01)


def arp_of(*addresses: str) -> str:
    lines = [f"{a} 0x1 0x2 02:00:00:00:00:01 * v0" for a in addresses]
    return "IP address HW type Flags HW address Mask Device\n" + "\n".join(lines) + "\n"


def test_hosts_file_then_seeds_then_neighbours(tmp_path: Path, resolver: FakeResolver) -> None:
    resolver.addresses = {
        "svc.corp.example": ["10.20.0.8", "2001:db8:77::8", "127.0.0.5"],
        "db1.corp.example": ["10.9.0.20"],
    }
    resolver.names = {
        "10.9.0.5": ["Five.Corp.Example.", "five", "bad_name", "localhost"],
        "10.9.0.20": ["db1.corp.example", "db1"],
    }
    seeds = ("SVC.corp.example", "svc.corp.example", "gone.corp.example", "localhost")

    async def scenario() -> None:
        # One lookup at a time, so that their order is the test's to check.
        arp = arp_of("10.9.0.5", "10.9.0.6", "10.9.0.20", "10.9.0.5")
        session = Session(tmp_path, ETC_HOSTS, arp, lookups=Lookups(workers=1))
        session.finder.request((*seeds, "db1.corp.example", "raises.unicode.example"))
        await served(session.finder)
        assert session.sent == [
            Hosts(tuple(HOSTS_ENTRIES)),
            Hosts((("svc.corp.example", "10.20.0.8"), ("svc.corp.example", "2001:db8:77::8"))),
            Hosts((("five.corp.example", "10.9.0.5"), ("five", "10.9.0.5"))),
        ]
        # Each name and neighbour once, the seeds first; localhost is not looked up.
        assert resolver.calls == [
            "svc.corp.example",
            "gone.corp.example",
            "db1.corp.example",
            "raises.unicode.example",
            "10.9.0.5",
            "10.9.0.6",
            "10.9.0.20",
        ]

    run(scenario())


def test_pairs_are_sent_once_per_session(tmp_path: Path, resolver: FakeResolver) -> None:
    resolver.addresses = {"a.example": ["10.1.0.1"], "b.example": ["10.1.0.2"]}

    async def scenario() -> None:
        session = Session(tmp_path, "10.1.0.1 a.example\n")
        session.finder.request(("a.example",))
        await served(session.finder)
        assert session.sent == [Hosts((("a.example", "10.1.0.1"),))]
        session.finder.request(("a.example",))
        await served(session.finder)
        assert len(session.sent) == 1  # nothing new
        session.finder.request(("a.example", "b.example"))
        await served(session.finder)
        assert session.sent[1:] == [Hosts((("b.example", "10.1.0.2"),))]

    run(scenario())


def test_many_pairs_go_in_messages_of_max_list(tmp_path: Path, resolver: FakeResolver) -> None:
    count = 2 * MAX_LIST + 50
    text = "".join(f"10.2.{i // 256}.{i % 256} h{i}.example\n" for i in range(1, count + 1))

    async def scenario() -> None:
        session = Session(tmp_path, text)
        session.finder.request(())
        await served(session.finder)
        assert [len(msg.entries) for msg in session.messages] == [MAX_LIST, MAX_LIST, 50]
        assert len(set(session.entries)) == count

    run(scenario())


def test_the_total_is_capped(
    tmp_path: Path, resolver: FakeResolver, caplog: pytest.LogCaptureFixture
) -> None:
    resolver.addresses = {"more.example": ["10.3.0.99"]}
    text = "".join(f"10.3.0.{i} h{i}.example\n" for i in range(1, 11))

    async def scenario() -> None:
        session = Session(tmp_path, text, max_entries=5)
        session.finder.request(("more.example",))
        await served(session.finder)
        assert len(session.entries) == 5
        assert session.finder.full
        assert resolver.calls == []  # full before the lookups: none is made
        session.finder.request(("more.example",))
        assert session.finder.serving is None  # a full session ignores further requests

    with caplog.at_level(logging.WARNING, logger="shuttle"):
        run(scenario())
    assert "5 host names sent" in caplog.text


def test_lookups_run_a_few_at_a_time_while_the_loop_goes_on(
    tmp_path: Path, resolver: FakeResolver
) -> None:
    names = [f"n{i}.example" for i in range(3 * LOOKUP_WORKERS)]
    resolver.addresses = {name: [f"10.4.0.{i + 1}"] for i, name in enumerate(names)}
    resolver.hang = set(names)

    async def scenario() -> None:
        session = Session(tmp_path, "10.4.1.1 early.example\n")
        session.finder.request(tuple(names))
        # The loop runs while every lookup is held: the hosts file's pairs are out already.
        await session.until([("early.example", "10.4.1.1")])
        while resolver.running < LOOKUP_WORKERS:
            await asyncio.sleep(0.01)
        assert sorted(resolver.calls) == sorted(names[:LOOKUP_WORKERS])
        resolver.released.set()
        await served(session.finder)
        assert sorted(resolver.calls) == sorted(names)
        assert resolver.most == LOOKUP_WORKERS
        assert set(session.entries) == {
            ("early.example", "10.4.1.1"),
            *((name, f"10.4.0.{i + 1}") for i, name in enumerate(names)),
        }

    run(scenario())


def test_a_stuck_lookup_is_given_up_and_keeps_its_thread(
    tmp_path: Path, resolver: FakeResolver, caplog: pytest.LogCaptureFixture
) -> None:
    resolver.addresses = {"stuck.example": ["10.5.0.1"], "next.example": ["10.5.0.2"]}
    resolver.hang = {"stuck.example"}

    async def scenario() -> None:
        # One thread at a time: the next lookup waits until the stuck one's thread ends.
        session = Session(tmp_path, lookups=Lookups(workers=1, timeout=0.05))
        session.finder.request(("stuck.example", "next.example"))
        while "stuck.example: no answer" not in caplog.text:
            await asyncio.sleep(0.01)
        assert resolver.calls == ["stuck.example"]
        resolver.released.set()
        await served(session.finder)
        # The stuck lookup's late answer is not sent: its caller had given up on it.
        await threads_ended()
        assert resolver.calls == ["stuck.example", "next.example"]
        assert session.entries == [("next.example", "10.5.0.2")]

    with caplog.at_level(logging.DEBUG, logger="shuttle"):
        run(scenario())


def test_nothing_is_sent_once_the_session_is_closed(tmp_path: Path, resolver: FakeResolver) -> None:
    resolver.addresses = {"late.example": ["10.6.0.1"]}
    resolver.hang = {"late.example"}

    async def scenario() -> None:
        session = Session(tmp_path, "10.6.1.1 early.example\n")
        session.finder.request(("late.example",))
        while resolver.running == 0:
            await asyncio.sleep(0.01)
        session.finder.close()
        resolver.released.set()
        await served(session.finder)
        await threads_ended()
        assert session.entries == [("early.example", "10.6.1.1")]
        session.finder.request(("late.example",))
        assert session.finder.serving is None

    run(scenario())


def test_requests_beyond_the_pending_ones_are_dropped(
    tmp_path: Path, resolver: FakeResolver, caplog: pytest.LogCaptureFixture
) -> None:
    resolver.addresses = {"again.example": ["10.7.0.1"]}

    async def scenario() -> None:
        session = Session(tmp_path)
        for _ in range(MAX_PENDING + 5):
            session.finder.request(("again.example",))
        await served(session.finder)
        assert resolver.calls == ["again.example"] * MAX_PENDING
        assert session.entries == [("again.example", "10.7.0.1")]

    with caplog.at_level(logging.WARNING, logger="shuttle"):
        run(scenario())
    assert "GetHosts ignored" in caplog.text


def test_missing_files_leave_the_seeds(
    tmp_path: Path, resolver: FakeResolver, caplog: pytest.LogCaptureFixture
) -> None:
    resolver.addresses = {"seed.example": ["10.8.0.1"]}

    async def scenario() -> None:
        sent: List[Message] = []
        missing = str(tmp_path / "missing")
        finder = HostFinder(sent.append, hosts_file=missing, arp_file=missing)
        finder.request(("seed.example",))
        await served(finder)
        assert sent == [Hosts((("seed.example", "10.8.0.1"),))]

    with caplog.at_level(logging.INFO, logger="shuttle"):
        run(scenario())
    assert "cannot read the host names" in caplog.text
    assert "cannot read the neighbours" in caplog.text


# -- the agent ----------------------------------------------------------------------------------

# Answers A, AAAA and PTR queries from a table given as JSON; never answers the names in
# "silent"; NXDOMAIN for the rest. Prints "ready" once it listens on 127.0.0.1:53.
DNS_SERVER = r"""
import json, socket, struct, sys
table = json.loads(sys.argv[1])
TYPES = {1: "A", 28: "AAAA", 12: "PTR"}
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 53))
print("ready", flush=True)
while True:
    query, peer = sock.recvfrom(4096)
    ident, flags = struct.unpack(">HH", query[:4])
    pos, labels = 12, []
    while query[pos]:
        labels.append(query[pos + 1 : pos + 1 + query[pos]].decode().lower())
        pos += 1 + query[pos]
    qtype = struct.unpack(">H", query[pos + 1 : pos + 3])[0]
    question = query[12 : pos + 5]
    name = ".".join(labels)
    if name in table["silent"]:
        continue
    records = table["records"].get(name, {})
    answers = b""
    values = records.get(TYPES.get(qtype, "?"), [])
    for value in values:
        if qtype == 1:
            data = socket.inet_pton(socket.AF_INET, value)
        elif qtype == 28:
            data = socket.inet_pton(socket.AF_INET6, value)
        else:
            data = b"".join(bytes([len(p)]) + p.encode() for p in value.split(".")) + b"\0"
        answers += struct.pack(">HHHIH", 0xC00C, qtype, 1, 60, len(data)) + data
    rcode = 0 if records else 3
    header = struct.pack(">HHHHHH", ident, 0x8480 | flags & 0x0100 | rcode, 1, len(values), 0, 0)
    sock.sendto(header + question + answers, peer)
"""
DNS_TABLE = {
    "records": {
        "svc.corp.example": {"A": ["10.20.0.8"], "AAAA": ["2001:db8:77::8"]},
        "loop.corp.example": {"A": ["127.0.0.5"]},
        "5.0.9.10.in-addr.arpa": {"PTR": ["neighbour-five.corp.example"]},
    },
    "silent": ["6.0.9.10.in-addr.arpa"],
}
# glibc's longest wait (30 s a try, 5 tries): the silent lookup outlasts the test.
RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:30 attempts:5\n"
FOUND = [
    *HOSTS_ENTRIES,
    ("svc.corp.example", "10.20.0.8"),
    ("svc.corp.example", "2001:db8:77::8"),
    ("neighbour-five.corp.example", "10.9.0.5"),
]


@pytest.fixture
def server_side(netns: Namespace) -> Iterator[Namespace]:
    """The namespace as a server: /etc/hosts, resolv.conf, neighbours, a nameserver."""
    netns.write_etc("hosts", ETC_HOSTS)
    netns.write_etc("resolv.conf", RESOLV_CONF)
    for n in (5, 6, 20):
        netns.ip("neigh", "add", f"10.9.0.{n}", "lladdr", f"02:00:00:00:00:{n:02x}", "dev", "v0")
    dns = subprocess.Popen(
        [*netns.wrapper, "/usr/bin/python3", "-c", DNS_SERVER, json.dumps(DNS_TABLE)],
        stdout=subprocess.PIPE,
    )
    try:
        assert dns.stdout is not None
        if not select.select([dns.stdout], [], [], STUCK)[0]:
            pytest.fail("the DNS server did not start")
        assert dns.stdout.readline() == b"ready\n"
        yield netns
    finally:
        dns.kill()
        dns.wait()
        if dns.stdout is not None:
            dns.stdout.close()


def collect_hosts(agent: AgentProcess, wanted: Sequence[Entry]) -> List[Entry]:
    """Every pair the agent sends until wanted have come, then until a Pong."""
    entries: List[Entry] = []
    for _ in range(1000):
        if set(wanted) <= set(entries):
            break
        msg = agent.receive()
        assert isinstance(msg, Hosts)
        entries.extend(msg.entries)
    agent.send(Ping(9))
    while (msg := agent.receive()) != Pong(9):
        assert isinstance(msg, Hosts)
        entries.extend(msg.entries)
    return entries


@pytest.mark.parametrize("python", PYTHONS)
def test_the_agent_finds_the_hosts_of_its_server(
    server_side: Namespace, start_agent: StartAgent, python: str
) -> None:
    agent = welcomed(start_agent(python, server_side.wrapper))
    agent.send(GetHosts(("svc.corp.example", "loop.corp.example", "gone.corp.example")))
    entries = collect_hosts(agent, FOUND)
    # Each pair once; nothing of localhost, loopback (loop.corp.example), and the silent
    # neighbour (10.9.0.6) still being looked up.
    assert sorted(entries) == sorted(FOUND)
    # The session goes on while the silent lookup waits for the nameserver...
    agent.send(Ping(10))
    assert agent.receive() == Pong(10)
    # ...and it ends at once when the client goes: no thread keeps the agent alive.
    status, stderr = agent.finish()
    assert status == 0, stderr
    assert "Traceback" not in stderr


def test_a_client_repeating_itself_leaves_the_agent_up(
    server_side: Namespace, start_agent: StartAgent
) -> None:
    agent = welcomed(start_agent(wrapper=server_side.wrapper))
    for _ in range(50):
        agent.send(GetHosts(("svc.corp.example",)))
    entries = collect_hosts(agent, FOUND)
    assert sorted(entries) == sorted(FOUND)  # each pair once, however often asked
    status, stderr = agent.finish()
    assert status == 0, stderr
    assert stderr.count("GetHosts ignored") == 1  # said once, not 45 times


def test_hosts_from_the_client_end_the_session(agent: AgentProcess) -> None:
    welcomed(agent).send(Hosts((("db1", "10.1.0.1"),)))
    error = agent.receive()
    assert isinstance(error, Error)
    assert "unexpected Hosts from the client" in error.text


def test_get_hosts_before_welcome_ends_the_session(agent: AgentProcess) -> None:
    agent.receive()
    agent.send(GetHosts(("db1",)))
    error = agent.receive()
    assert isinstance(error, Error)
    assert "before Welcome" in error.text

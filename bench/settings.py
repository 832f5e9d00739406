"""What one run of the comparison measures and for how long: the full run, or --quick (short
durations and smaller counts, a smoke run), and the choices the command line makes."""

from __future__ import annotations

from dataclasses import dataclass

# shuttle: --tcp=auto (the default, ssh carries TCP where it can); shuttle-agent: --tcp=agent.
SYSTEMS = ("shuttle", "shuttle-agent", "ssh-L", "sshuttle")
# Asked for by name only. ssh-L-redirect: ssh -L reached through an nft redirect of the
# target's own address, the ceiling of a shortcut (docs/performance.md, session 15).
EXTRA_SYSTEMS = ("ssh-L-redirect",)
CASES = ("bulk", "rtt", "conns", "rate", "start", "rss", "relay")
CIPHER = "chacha20-poly1305@openssh.com"  # OpenSSH's default, pinned for all three
SSHUTTLE = "sshuttle==2.0.0"  # the current release (PyPI, 2026-09)


@dataclass(frozen=True)
class Sizes:
    """How long and how much each measurement runs."""

    bulk_seconds: int  # iperf3 -t (after one omitted second of slow start)
    relay_seconds: int  # the same through the relay, where there are more runs
    rtt_echoes: int  # echoes per RTT measurement, at most
    rtt_seconds: float  # and for at most this long
    conns: tuple[int, int]  # simultaneous connections: a small and a big count
    conns_timeout: float
    rate_seconds: float
    hold: int  # idle connections while the client's memory is read
    excludes: int  # /32s in the exclude file of the start and stop case
    starts: int  # starts per start/stop figure (median): one start is one sample
    start_timeout: float  # a start not tunnelling within this is a failure


FULL = Sizes(
    bulk_seconds=10,
    relay_seconds=5,
    rtt_echoes=3_000,
    rtt_seconds=3.0,
    conns=(1_000, 10_000),
    conns_timeout=30.0,
    rate_seconds=5.0,
    hold=10_000,
    excludes=10_000,
    starts=3,
    start_timeout=60.0,
)
QUICK = Sizes(
    bulk_seconds=2,
    relay_seconds=2,
    rtt_echoes=300,
    rtt_seconds=1.0,
    conns=(100, 1_000),
    conns_timeout=10.0,
    rate_seconds=1.0,
    hold=1_000,
    excludes=1_000,
    starts=1,
    start_timeout=20.0,
)


@dataclass(frozen=True)
class Settings:
    systems: tuple[str, ...]
    cases: tuple[str, ...]
    sizes: Sizes
    repeat: int  # runs of every measurement; the table shows medians
    cipher: str
    method: str  # shuttle's firewall method
    sshuttle: str  # what pip installs
    delay_ms: float  # the relay's delay, each way
    streams: int  # shuttle's --streams, compared with 1 through the relay; as many
    # parallel connections then carry the bulk (streams spread connections, not bytes)

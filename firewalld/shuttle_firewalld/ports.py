"""Who owns a listening TCP port, from the kernel's socket tables /proc/net/tcp and tcp6.

A session may redirect traffic only into a port its caller listens on; the uid column of
these tables is the socket owner's, as the kernel recorded it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

PROC_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
TCP_LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN = 10


def parse_listeners(text: str) -> Iterator[tuple[int, int]]:
    """(port, uid) of each listening socket in one table; other lines are skipped."""
    for line in text.splitlines()[1:]:  # the first line is the column header
        fields = line.split()
        # sl local_address rem_address st tx:rx tr:tm retrnsmt uid timeout inode ...
        if len(fields) < 10 or fields[3] != TCP_LISTEN:
            continue
        _address, _, port_hex = fields[1].rpartition(":")
        try:
            yield int(port_hex, 16), int(fields[7])
        except ValueError:
            continue


def port_owners(port: int, tables: Iterable[str] = PROC_TABLES) -> set[int]:
    """The uids that have a TCP socket listening on port, in this network namespace."""
    owners: set[int] = set()
    for path in tables:
        try:
            with open(path, encoding="ascii") as table:
                text = table.read()
        except FileNotFoundError:  # no tcp6 table when IPv6 is disabled
            continue
        owners.update(uid for listen_port, uid in parse_listeners(text) if listen_port == port)
    return owners

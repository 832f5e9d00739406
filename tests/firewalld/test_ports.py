"""Listening-port owners from the kernel's /proc/net/tcp tables."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from shuttle_firewalld.ports import parse_listeners, port_owners

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:300C 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 121 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 122 1 0000000000000000 100 0 0 10 0
   2: 0100007F:300D 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000  1001        0 123 1 0000000000000000 20 4 30 10 -1
   3: garbage
   4: 0100007F:ZZZZ 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 124 1
"""  # noqa: E501

TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:300C 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1002        0 130 1 0000000000000000 100 0 0 10 0
"""  # noqa: E501


def test_parse_listeners_takes_listening_sockets_only() -> None:
    # Port 0x300D is connected (state 01), not listening; malformed lines are skipped.
    assert list(parse_listeners(TCP)) == [(0x300C, 1000), (0x16, 0)]


def test_parse_listeners_ipv6() -> None:
    assert list(parse_listeners(TCP6)) == [(0x300C, 1002)]


def test_parse_listeners_of_an_empty_table() -> None:
    assert list(parse_listeners("")) == []
    assert list(parse_listeners(TCP.splitlines()[0])) == []


def test_port_owners_reads_both_tables(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text(TCP)
    (tmp_path / "tcp6").write_text(TCP6)
    tables = [str(tmp_path / "tcp"), str(tmp_path / "tcp6"), str(tmp_path / "missing")]
    assert port_owners(0x300C, tables) == {1000, 1002}
    assert port_owners(0x16, tables) == {0}
    assert port_owners(0x300D, tables) == set()


def test_port_owners_sees_a_real_listener() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        assert os.getuid() not in port_owners(port)  # bound is not listening yet
        listener.listen()
        assert os.getuid() in port_owners(port)

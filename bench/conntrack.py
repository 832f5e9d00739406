"""Empty the conntrack table of the network namespace this runs in, as `conntrack -F` does,
without conntrack-tools: ctnetlink's delete with no tuple is a flush, once for IPv4 and once
for IPv6. Exit status 1, with the kernel's errno, if it refuses.

The bench runs it (as root, in C) after each system's turn in a case. A connection the last
system left closing keeps its entry, and with it the NAT to that system's port; a new SYN
from the same source port to the same target follows the entry there and is refused. Once
the systems took turns, the rss case lost 95 to 263 of its 10,000 connections that way.

Standalone (no imports of ours): `ip netns exec NAME python3 bench/conntrack.py`.
"""

import socket
import struct
import sys

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
HEADER = struct.Struct("=LHHLL")  # struct nlmsghdr
NFGENMSG = struct.Struct("=BBH")  # struct nfgenmsg: family, version, resource id
RECV_SIZE = 4096


def flush(family: int, sequence: int) -> int:
    """Flush one address family's entries; 0, or the errno the kernel answered."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.settimeout(5)
        body = NFGENMSG.pack(family, 0, 0)
        kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
        sock.send(
            HEADER.pack(HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, sequence, 0)
            + body
        )
        answer = sock.recv(RECV_SIZE)
    _length, answer_kind, _flags, _sequence, _pid = HEADER.unpack_from(answer)
    if answer_kind != NLMSG_ERROR:
        return 0
    (error,) = struct.unpack_from("=i", answer, HEADER.size)
    return -int(error)


def main() -> int:
    for sequence, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
        error = flush(family, sequence)
        if error:
            print(f"conntrack flush refused: errno {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

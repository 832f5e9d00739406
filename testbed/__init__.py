"""The shared namespace network for integration tests, the demo and benchmarks.

Three network namespaces (client host C, ssh server S, target T) linked in IPv4 and IPv6, a
real sshd on S, test servers on T, two unprivileged local users and a venv they can run
shuttle from.
"""

from testbed.config import (
    BULK_PORT,
    CLOSED_PORT,
    ECHO_PORT,
    HTTP_PORT,
    S_ADDR6_C,
    S_ADDR_C,
    SYSTEM_PYTHON,
    T_ADDR,
    T_ADDR2,
    T_ADDR6,
    T_ADDR6_2,
    TARGET_NET,
    TARGET_NET6,
    UDP_ECHO_PORT,
)
from testbed.procs import CommandError, Proc
from testbed.shuttle import (
    METHODS,
    TPROXY,
    Routing,
    Shuttle,
    StartupError,
    leftovers,
    nat6_rules,
    nat_chains,
    nat_rules,
    nft_tables,
    ready_line,
    ready_method,
    routing_leftovers,
    routing_state,
    shuttle_rules,
    wait_rules_gone,
)
from testbed.topology import Topology
from testbed.user import LocalUser, ensure_second_user, ensure_user
from testbed.venv import UserVenv

__all__ = [
    "BULK_PORT",
    "CLOSED_PORT",
    "ECHO_PORT",
    "HTTP_PORT",
    "METHODS",
    "SYSTEM_PYTHON",
    "S_ADDR6_C",
    "S_ADDR_C",
    "TARGET_NET",
    "TARGET_NET6",
    "TPROXY",
    "T_ADDR",
    "T_ADDR2",
    "T_ADDR6",
    "T_ADDR6_2",
    "UDP_ECHO_PORT",
    "CommandError",
    "LocalUser",
    "Proc",
    "Routing",
    "Shuttle",
    "StartupError",
    "Topology",
    "UserVenv",
    "ensure_second_user",
    "ensure_user",
    "leftovers",
    "nat6_rules",
    "nat_chains",
    "nat_rules",
    "nft_tables",
    "ready_line",
    "ready_method",
    "routing_leftovers",
    "routing_state",
    "shuttle_rules",
    "wait_rules_gone",
]

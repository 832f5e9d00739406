"""The shared namespace network for integration tests, the demo and benchmarks.

Three network namespaces (client host C, ssh server S, target T), a real sshd on S, test
servers on T, an unprivileged local user and a venv that user can run shuttle from.
"""

from testbed.config import (
    BULK_PORT,
    CLOSED_PORT,
    ECHO_PORT,
    HTTP_PORT,
    SYSTEM_PYTHON,
    T_ADDR,
    T_ADDR2,
    TARGET_NET,
)
from testbed.procs import CommandError, Proc
from testbed.shuttle import Shuttle, StartupError, nat_rules, shuttle_rules
from testbed.topology import Topology
from testbed.user import LocalUser, ensure_user
from testbed.venv import UserVenv

__all__ = [
    "BULK_PORT",
    "CLOSED_PORT",
    "ECHO_PORT",
    "HTTP_PORT",
    "SYSTEM_PYTHON",
    "TARGET_NET",
    "T_ADDR",
    "T_ADDR2",
    "CommandError",
    "LocalUser",
    "Proc",
    "Shuttle",
    "StartupError",
    "Topology",
    "UserVenv",
    "ensure_user",
    "nat_rules",
    "shuttle_rules",
]

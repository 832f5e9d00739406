"""Where shuttle-client's log goes: stderr, and with --syslog (or -D) syslog too, through
/dev/log with the ident shuttle-client[PID]; Throttle, for events that may come by the
thousand; printable, for the remote side's text in a log line or an error; and stage, the
start-up's steps with their time since the process started (-v)."""

import errno
import logging
import logging.handlers
import os
import socket
import sys
import time
from typing import Optional

DEV_LOG = "/dev/log"
IDENT = "shuttle-client"

log = logging.getLogger("shuttle")


def printable(text: str) -> str:
    """The agent's text made safe for a terminal: it could carry escape sequences."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class Throttle:
    """Counts an event that anyone may cause at any rate, so that it is logged at most once
    per interval seconds, with how many came since the last line."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.count = 0
        self.logged_at = float("-inf")

    def due(self) -> int:
        """Count one event; how many to report if a line is due now, else 0."""
        self.count += 1
        now = time.monotonic()
        if now - self.logged_at < self.interval:
            return 0
        count, self.count, self.logged_at = self.count, 0, now
        return count


def started_at() -> float:
    """When this process started, on CLOCK_BOOTTIME, the clock of the kernel's process
    start times (in clock ticks: 10 ms steps); now where /proc cannot tell."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            # Field 22, counted after the command name, which may hold spaces.
            ticks = int(stat.read().rpartition(b")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return ticks / os.sysconf("SC_CLK_TCK")


STARTED_AT = started_at()


def stage(what: str) -> None:
    """A step of the start-up, with the milliseconds since the process started (the Python
    interpreter's own start and the imports included), for finding where a start's time
    goes (docs/performance.md)."""
    log.debug("start-up: %s at %.0f ms", what, since_start())


def since_start() -> float:
    """Milliseconds since the process started."""
    return (time.clock_gettime(time.CLOCK_BOOTTIME) - STARTED_AT) * 1000


class QuietSysLogHandler(logging.handlers.SysLogHandler):
    """A syslog handler that loses a record when syslog has gone away, as C's syslog()
    does, instead of printing a traceback on stderr (which is /dev/null for a daemon)."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def configure(verbose: bool, syslog: bool, address: str = DEV_LOG) -> logging.Handler:
    """Log to stderr, and with syslog to the syslog socket at address (a warning, and
    stderr only, if nothing listens there); the stderr handler, for a daemon to remove."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter(f"{IDENT}: %(message)s"))
    root.addHandler(stderr)
    if syslog:
        handler = syslog_handler(address)
        if handler is not None:
            root.addHandler(handler)
    return stderr


def syslog_handler(address: str) -> Optional[logging.Handler]:
    """A handler for the syslog socket at address; None, with a warning, if none is there.

    SysLogHandler itself would accept a missing socket and fail at every record, so the
    socket is tried first: as a datagram socket (as /dev/log is), which costs the listener
    nothing; a stream socket refuses that with EPROTOTYPE, and the handler connects to it.
    """
    socktype = socket.SOCK_DGRAM
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(address)
        except OSError as exc:
            if exc.errno != errno.EPROTOTYPE:
                why = exc.strerror or exc
                log.warning("cannot log to syslog at %s: %s; logging to stderr only", address, why)
                return None
            socktype = socket.SOCK_STREAM
    handler = QuietSysLogHandler(address=address, socktype=socktype)
    # Made after a -D fork, so the pid is the daemon's.
    handler.ident = f"{IDENT}[{os.getpid()}]: "
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler

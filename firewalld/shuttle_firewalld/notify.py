"""sd_notify without libsystemd: tell the service manager on $NOTIFY_SOCKET (systemd, for the
Type=notify unit) that firewalld is ready, how many sessions it has, that it stops."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(**fields: str) -> bool:
    """Send the fields as "KEY=value" lines (ready="1" -> READY=1), in one datagram, to
    $NOTIFY_SOCKET (a path, or @name for an abstract socket). False, with nothing sent, when
    the variable is unset; False, and a log line, when sending fails: never an exception,
    since a status report must not take the root daemon down."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]  # the abstract namespace: no file, a leading NUL
    elif address.startswith("/"):
        target = address
    else:
        log.warning("NOTIFY_SOCKET %r is not a unix socket address: not notifying", address)
        return False
    # A newline inside a value would start another assignment.
    lines = (f"{key.upper()}={' '.join(value.splitlines())}" for key, value in fields.items())
    message = "".join(f"{line}\n" for line in lines)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # Never stall the loop on a manager that does not read: drop the report instead.
            sock.setblocking(False)
            sock.sendto(message.encode("utf-8", "replace"), target)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", address, exc)
        return False
    return True

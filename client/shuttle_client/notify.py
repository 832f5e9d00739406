"""sd_notify without libsystemd: tell the service manager that listens on $NOTIFY_SOCKET
(systemd, for a Type=notify unit) that the client is ready, what it is doing, that it stops."""

import logging
import os
import socket

log = logging.getLogger("shuttle")


def notify(**fields: str) -> bool:
    """Send the fields as "KEY=value" lines (ready="1" → READY=1), one datagram, to
    $NOTIFY_SOCKET (a path, or @name for an abstract socket). False, and nothing sent, when
    the variable is unset; False, logged at debug, when sending fails: never an exception."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        target = "\0" + address[1:]
    elif address.startswith("/"):
        target = address
    else:
        log.debug("NOTIFY_SOCKET %r is not a unix socket: not notifying", address)
        return False
    # A newline inside a value would start another assignment.
    lines = (f"{key.upper()}={' '.join(value.splitlines())}" for key, value in fields.items())
    message = "".join(f"{line}\n" for line in lines)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # Never block the event loop on a manager that does not read: drop instead.
            sock.setblocking(False)
            sock.sendto(message.encode("utf-8", "replace"), target)
    except OSError as exc:
        log.debug("cannot notify %s: %s", address, exc)
        return False
    return True

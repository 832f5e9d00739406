"""sd_notify without libsystemd: tell the service manager on $NOTIFY_SOCKET (systemd, for a
Type=notify unit) that a program is ready, what it is doing, that it stops."""

import logging
import os
import socket


class Notifier:
    """Sends sd_notify reports; a failure is logged to log at level, never raised: a status
    report must take neither the client nor the root daemon down."""

    def __init__(self, log: logging.Logger, level: int) -> None:
        self.log = log
        self.level = level

    def __call__(self, **fields: str) -> bool:
        """Send the fields as "KEY=value" lines (ready="1" -> READY=1), in one datagram, to
        $NOTIFY_SOCKET (a path, or @name for an abstract socket). False, with nothing sent,
        when the variable is unset; False, and a log line, when sending fails."""
        address = os.environ.get("NOTIFY_SOCKET", "")
        if not address:
            return False
        if address.startswith("@"):
            target = "\0" + address[1:]  # the abstract namespace: no file, a leading NUL
        elif address.startswith("/"):
            target = address
        else:
            self.log.log(
                self.level, "NOTIFY_SOCKET %r is not a unix socket address: not notifying", address
            )
            return False
        # A newline inside a value would start another assignment.
        lines = (f"{key.upper()}={' '.join(value.splitlines())}" for key, value in fields.items())
        message = "".join(f"{line}\n" for line in lines)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Never stall a loop on a manager that does not read: drop the report instead.
                sock.setblocking(False)
                sock.sendto(message.encode("utf-8", "replace"), target)
        except OSError as exc:
            self.log.log(self.level, "cannot notify the service manager at %s: %s", address, exc)
            return False
        return True

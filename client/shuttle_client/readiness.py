"""The one place where run() says it is ready, and that it stops: to systemd (sd_notify)
and to whoever else waits for it (the -D parent, through the daemon's pipe)."""

import logging
from typing import Callable, List, Sequence

from shuttle_local.notify import Notifier

# Without a service manager's answer there is nothing to do: a failure is for -v only.
notify = Notifier(logging.getLogger("shuttle"), logging.DEBUG)


class Readiness:
    """Tells the service manager, and once the callbacks, that the client is ready."""

    def __init__(self, on_ready: Sequence[Callable[[], None]] = ()) -> None:
        self._on_ready: List[Callable[[], None]] = list(on_ready)

    def ready(self, status: str) -> None:
        """Ready, doing what status says. The callbacks run the first time only: a daemon
        lets go of its terminal once."""
        notify(ready="1", status=status)
        callbacks, self._on_ready = self._on_ready, []
        for callback in callbacks:
            callback()

    def status(self, text: str) -> None:
        """What the client is doing now (the tunnel was lost, or is back)."""
        notify(status=text)

    def stopping(self) -> None:
        """The client begins to stop (its rules go first)."""
        notify(stopping="1")

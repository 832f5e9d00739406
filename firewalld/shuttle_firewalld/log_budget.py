"""A budget of log lines per uid for what the loop refuses at once (frames too long, requests
answered busy): a member who floods the daemon could otherwise write hundreds of lines a
second into the journal, and the loop would spend its time formatting them. Past the budget
the lines are counted, and said in one line when the window ends."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("shuttle-firewalld")

LINES = 10  # a uid's lines in a window
WINDOW = 10.0  # seconds
MAX_UIDS = 1024  # uids kept track of: past it, those whose window has run out are forgotten


@dataclass
class _Window:
    start: float
    lines: int = 0
    unsaid: int = 0


class LogBudget:
    """Whether a uid's next refusal may be logged, LINES a WINDOW at most."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[int, _Window] = {}

    def allow(self, uid: int) -> bool:
        """True if this line of uid's may be logged; counted as unsaid if not."""
        now = self._clock()
        window = self._windows.get(uid)
        if window is None or now - window.start >= WINDOW:
            if window is not None:
                self._say_unsaid(uid, window)
            elif len(self._windows) >= MAX_UIDS:
                self._forget(now)
            window = self._windows[uid] = _Window(now)
        if window.lines < LINES:
            window.lines += 1
            return True
        window.unsaid += 1
        return False

    def _forget(self, now: float) -> None:
        for uid, window in list(self._windows.items()):
            if now - window.start >= WINDOW:
                self._say_unsaid(uid, window)
                del self._windows[uid]

    @staticmethod
    def _say_unsaid(uid: int, window: _Window) -> None:
        if window.unsaid:
            log.info(
                "refused %d more frames or requests of uid %d in %g s (not logged each)",
                window.unsaid,
                uid,
                WINDOW,
            )

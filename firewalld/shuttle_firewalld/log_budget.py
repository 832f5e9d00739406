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
    refusals: int = 0  # the first LINES of them logged


class LogBudget:
    """Whether a uid's next refusal may be logged, LINES a WINDOW at most."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[int, _Window] = {}
        self._next_settle = clock() + WINDOW

    def allow(self, uid: int) -> bool:
        """True if this line of uid's may be logged; counted as unsaid if not."""
        now = self._clock()
        window = self._windows.get(uid)
        if window is not None and now - window.start >= WINDOW:
            self._end(uid, window)
            window = None
        if window is None:
            if len(self._windows) >= MAX_UIDS:
                self._settle(now)
            window = self._windows[uid] = _Window(now)
        window.refusals += 1
        return window.refusals <= LINES

    def settle(self) -> None:
        """Say what the windows that ran out left unsaid, and forget them: a flood that
        stops gets its count logged all the same. For each turn of the loop; it does its
        work once a WINDOW."""
        now = self._clock()
        if now >= self._next_settle:
            self._next_settle = now + WINDOW
            self._settle(now)

    def _settle(self, now: float) -> None:
        for uid, window in list(self._windows.items()):
            if now - window.start >= WINDOW:
                self._end(uid, window)

    def _end(self, uid: int, window: _Window) -> None:
        del self._windows[uid]
        if window.refusals > LINES:
            log.info(
                "refused %d more frames or requests of uid %d in %g s (not logged each)",
                window.refusals - LINES,
                uid,
                WINDOW,
            )

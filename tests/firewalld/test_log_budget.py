"""The loop's budget of refusal lines per uid: a flooding member gets LINES lines a window
and one line of how many more (also when it stops), and takes nothing from another uid's
lines."""

from __future__ import annotations

import logging

import pytest
from shuttle_firewalld.log_budget import LINES, MAX_UIDS, WINDOW, LogBudget

from .fakes import FakeClock


def unsaid_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not logged each" in r.getMessage()]


def test_a_flood_is_logged_ten_lines_a_window_then_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    budget = LogBudget(clock)
    with caplog.at_level(logging.INFO, logger="shuttle-firewalld"):
        allowed = [budget.allow(1000) for _ in range(LINES + 25)]
        assert allowed == [True] * LINES + [False] * 25
        assert budget.allow(1001)  # another uid's lines are its own
        assert unsaid_lines(caplog) == []
        clock.now += WINDOW
        assert budget.allow(1000)  # a new window
    assert unsaid_lines(caplog) == [
        f"refused 25 more frames or requests of uid 1000 in {WINDOW:g} s (not logged each)"
    ]


def test_uids_kept_track_of_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    budget = LogBudget(clock)
    with caplog.at_level(logging.INFO, logger="shuttle-firewalld"):
        for _ in range(LINES + 1):
            budget.allow(0)
        for uid in range(1, MAX_UIDS):
            budget.allow(uid)
        clock.now += WINDOW
        assert budget.allow(MAX_UIDS)  # the old windows are forgotten, their counts said
        assert len(budget._windows) == 1
    assert unsaid_lines(caplog) == [
        f"refused 1 more frames or requests of uid 0 in {WINDOW:g} s (not logged each)"
    ]


def test_a_flood_that_stops_gets_its_count_said_by_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    budget = LogBudget(clock)
    with caplog.at_level(logging.INFO, logger="shuttle-firewalld"):
        for _ in range(LINES + 3):
            budget.allow(1000)
        budget.settle()  # the loop's turn while the window runs: nothing yet
        assert unsaid_lines(caplog) == []
        clock.now += WINDOW
        budget.settle()
        assert budget._windows == {}
    assert unsaid_lines(caplog) == [
        f"refused 3 more frames or requests of uid 1000 in {WINDOW:g} s (not logged each)"
    ]

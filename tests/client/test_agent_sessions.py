"""How many agent sessions the measured bandwidth-delay products ask for
(shuttle_client.agent_sessions.wanted_sessions): none more while no session is held back by
its ssh window; enough windows for all of it, and SPARE with room, once one is; one more, a
quiet lane, while every session is busy."""

import pytest
from shuttle_client.agent_sessions import (
    MAX_SESSIONS,
    SATURATED,
    SPARE,
    SSH_WINDOW,
    wanted_sessions,
)

FULL = SATURATED * SSH_WINDOW  # a session held back by its window


@pytest.mark.parametrize(
    ("products", "wanted"),
    [
        ([0.0], 1),  # idle
        ([FULL * 0.99], 1),  # busy, but the window is not what holds it back
        ([FULL * 0.5, FULL * 0.9], 2),  # none held back: nothing changes
        ([FULL], 1 + SPARE),  # held back by its window: SPARE more sessions with room
        ([FULL * 1.2], 2 + SPARE),  # more than it, seen through one window
        ([FULL, FULL * 0.2], 2 + SPARE),
        ([FULL, FULL, FULL], 3 + SPARE),
        ([FULL * 3, 0.0], 3 + SPARE),
        ([FULL] * 20, 20),  # never fewer than there are
        ([FULL * 100], MAX_SESSIONS),  # at most MAX_SESSIONS
    ],
)
def test_wanted_sessions(products: list, wanted: int) -> None:
    assert wanted_sessions(products, [False] * len(products)) == wanted


@pytest.mark.parametrize(
    ("products", "busy", "wanted"),
    [
        ([0.0], [True], 2),  # a bulk transfer on a short link: a quiet lane beside it
        ([0.0, 0.0], [True, False], 2),  # the quiet lane is there
        ([0.0, 0.0], [True, True], 3),  # both carry bulk: one more
        ([FULL], [True], 1 + SPARE),  # held back by the window: the SPARE ones are quiet
        ([0.0] * MAX_SESSIONS, [True] * MAX_SESSIONS, MAX_SESSIONS),  # at most MAX_SESSIONS
        ([], [], 0),
    ],
)
def test_a_quiet_lane_while_every_session_is_busy(products: list, busy: list, wanted: int) -> None:
    assert wanted_sessions(products, busy) == wanted


def test_one_busy_flag_per_session() -> None:
    with pytest.raises(ValueError):
        wanted_sessions([0.0, 0.0], [True])

"""How many agent sessions the measured bandwidth-delay products ask for
(shuttle_client.agent_sessions.wanted_sessions): none more while no session is held back by
its ssh window; enough windows for all of it, and SPARE with room, once one is."""

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
    assert wanted_sessions(products) == wanted

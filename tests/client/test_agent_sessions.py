"""How many agent sessions the measured bandwidth-delay products ask for
(shuttle_client.agent_sessions.wanted_sessions): none more while no session is held back by
its ssh window; enough windows for all of it, and one with room, once one is."""

import pytest
from shuttle_client.agent_sessions import MAX_SESSIONS, SATURATED, SSH_WINDOW, wanted_sessions

FULL = SATURATED * SSH_WINDOW  # a session held back by its window


@pytest.mark.parametrize(
    ("products", "wanted"),
    [
        ([0.0], 1),  # idle
        ([FULL * 0.99], 1),  # busy, but the window is not what holds it back
        ([FULL * 0.5, FULL * 0.9], 2),  # none held back: nothing changes
        ([FULL], 2),  # one window's worth: one more session with room
        ([FULL * 1.2], 3),  # more than a window's worth can only be seen as one: two more
        ([FULL, FULL * 0.2], 3),
        ([FULL, FULL, FULL], 4),
        ([FULL * 3, 0.0], 4),
        ([FULL] * 20, MAX_SESSIONS + 12),  # never fewer than there are
        ([FULL * 100], MAX_SESSIONS),  # at most MAX_SESSIONS
    ],
)
def test_wanted_sessions(products: list, wanted: int) -> None:
    assert wanted_sessions(products) == wanted

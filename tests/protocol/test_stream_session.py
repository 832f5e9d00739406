"""The stream session's table (stream_session.TABLE) as it stands, and each end's phases:
the greeting and its version check, what is refused before and after it, Ping answered."""

import pytest
from shuttle_protocol import PROTOCOL_VERSION
from shuttle_protocol.mux import AGENT, CLIENT
from shuttle_protocol.schema import Message
from shuttle_protocol.stream_messages import (
    Error,
    GetHosts,
    GetNameservers,
    GetRoutes,
    Hello,
    Hosts,
    Nameservers,
    Open,
    Opened,
    Ping,
    Pong,
    ProbeListen,
    ProbeListening,
    Refused,
    Routes,
    UdpOpen,
    Welcome,
)
from shuttle_protocol.stream_session import (
    TABLE,
    SessionError,
    Step,
    StreamSession,
)

HELLO = Hello(PROTOCOL_VERSION, ("tcp", "udp"), "3.11.2")
WELCOME = Welcome(PROTOCOL_VERSION, ("tcp",))


def greeted(role: str) -> StreamSession:
    session = StreamSession(role, ("tcp",))
    session.receive(HELLO if role == CLIENT else WELCOME)
    return session


def test_the_table_as_it_stands() -> None:
    assert TABLE[CLIENT].greeting is Hello
    assert TABLE[CLIENT].greeted == {
        Opened,
        Refused,
        Ping,
        Pong,
        ProbeListening,
        Routes,
        Nameservers,
        Hosts,
    }
    assert TABLE[AGENT].greeting is Welcome
    assert TABLE[AGENT].greeted == {
        Open,
        UdpOpen,
        Ping,
        Pong,
        GetRoutes,
        GetNameservers,
        GetHosts,
        ProbeListen,
    }


def test_the_client_answers_hello_with_welcome() -> None:
    session = StreamSession(CLIENT, ("tcp",))
    assert session.receive(HELLO) == Step(Welcome(PROTOCOL_VERSION, ("tcp",)), True)
    assert session.greeted and session.peer_greeting == HELLO


def test_the_agent_takes_welcome_without_answer() -> None:
    session = StreamSession(AGENT, ("tcp",))
    assert session.receive(WELCOME) == Step(None, True)
    assert session.greeted


@pytest.mark.parametrize(
    ("role", "greeting", "text"),
    [
        (
            CLIENT,
            Hello(PROTOCOL_VERSION + 1, (), "3.12.0"),
            f"protocol version mismatch: the agent speaks {PROTOCOL_VERSION + 1}, "
            f"this client {PROTOCOL_VERSION}",
        ),
        (
            AGENT,
            Welcome(PROTOCOL_VERSION + 1, ()),
            f"client speaks protocol {PROTOCOL_VERSION + 1}, agent {PROTOCOL_VERSION}",
        ),
    ],
)
def test_another_version_is_one_clear_error(role: str, greeting: Message, text: str) -> None:
    session = StreamSession(role, ())
    with pytest.raises(SessionError) as caught:
        session.receive(greeting)
    assert str(caught.value) == text
    assert not session.greeted


@pytest.mark.parametrize(
    ("role", "msg", "text"),
    [
        (CLIENT, Ping(1), "Ping before Hello"),
        (CLIENT, Opened(1), "Opened before Hello"),
        (CLIENT, Welcome(PROTOCOL_VERSION, ()), "Welcome before Hello"),
        (AGENT, Open(1, "192.0.2.1", 80), "Open before Welcome"),
        (AGENT, Pong(1), "Pong before Welcome"),
        (AGENT, HELLO, "Hello before Welcome"),
    ],
)
def test_nothing_but_the_greeting_and_error_before_the_greeting(
    role: str, msg: Message, text: str
) -> None:
    session = StreamSession(role, ())
    with pytest.raises(SessionError) as caught:
        session.receive(msg)
    assert str(caught.value) == text
    assert session.receive(Error("the other end gave up")) == Step(None, True)


@pytest.mark.parametrize(
    ("role", "msg", "text"),
    [
        (CLIENT, HELLO, "Hello twice"),
        (AGENT, WELCOME, "Welcome twice"),
        (CLIENT, Open(1, "192.0.2.1", 80), "unexpected Open from the agent"),
        (CLIENT, GetRoutes(), "unexpected GetRoutes from the agent"),
        (AGENT, Routes((), False), "unexpected Routes from the client"),
        (AGENT, Opened(1), "unexpected Opened from the client"),
    ],
)
def test_after_the_greeting_only_what_the_table_lists(role: str, msg: Message, text: str) -> None:
    with pytest.raises(SessionError) as caught:
        greeted(role).receive(msg)
    assert str(caught.value) == text


@pytest.mark.parametrize("role", [CLIENT, AGENT])
def test_ping_is_answered_by_the_session_and_pong_goes_to_the_driver(role: str) -> None:
    session = greeted(role)
    assert session.receive(Ping(7)) == Step(Pong(7), False)
    assert session.receive(Pong(8)) == Step(None, True)


# One message of each type the table lets through to the driver, per end.
DISPATCHED = {
    CLIENT: [
        Opened(1),
        Refused(1, 111, "Connection refused"),
        Pong(1),
        ProbeListening(2222),
        Routes((), False),
        Nameservers(()),
        Hosts(()),
    ],
    AGENT: [
        Open(1, "192.0.2.1", 80),
        UdpOpen(2, "192.0.2.53", 53),
        Pong(1),
        GetRoutes(),
        GetNameservers(),
        GetHosts(()),
        ProbeListen(),
    ],
}


@pytest.mark.parametrize("role", [CLIENT, AGENT])
def test_everything_else_the_table_allows_goes_to_the_driver(role: str) -> None:
    assert {type(msg) for msg in DISPATCHED[role]} == TABLE[role].greeted - {Ping}
    session = greeted(role)
    for msg in DISPATCHED[role]:
        assert session.receive(msg) == Step(None, True)

"""The stream session's table (stream_session.TABLE) as it stands, and each end's phases:
the greeting and its version check, what is refused before and after it, Ping answered."""

import pytest
from shuttle_protocol import PROTOCOL_VERSION
from shuttle_protocol import stream_messages as sm
from shuttle_protocol.mux import AGENT, CLIENT
from shuttle_protocol.schema import REGISTRY, STREAM_TAGS, Message
from shuttle_protocol.stream_session import (
    TABLE,
    SessionError,
    Step,
    StreamSession,
)

from .strategies import EXAMPLES

HELLO = sm.Hello(PROTOCOL_VERSION, ("tcp", "udp"), "3.11.2")
WELCOME = sm.Welcome(PROTOCOL_VERSION, ("tcp",))


def greeted(role: str) -> StreamSession:
    session = StreamSession(role, ("tcp",))
    session.receive(HELLO if role == CLIENT else WELCOME)
    return session


def test_the_table_as_it_stands() -> None:
    assert TABLE[CLIENT].greeting is sm.Hello
    assert TABLE[CLIENT].greeted == {
        sm.Opened,
        sm.Refused,
        sm.Ping,
        sm.Pong,
        sm.ProbeListening,
        sm.Routes,
        sm.Nameservers,
        sm.Hosts,
    }
    assert TABLE[AGENT].greeting is sm.Welcome
    assert TABLE[AGENT].greeted == {
        sm.Open,
        sm.UdpOpen,
        sm.Ping,
        sm.Pong,
        sm.GetRoutes,
        sm.GetNameservers,
        sm.GetHosts,
        sm.ProbeListen,
        sm.Pace,
    }


def test_the_client_answers_hello_with_welcome() -> None:
    session = StreamSession(CLIENT, ("tcp",))
    assert session.receive(HELLO) == Step(sm.Welcome(PROTOCOL_VERSION, ("tcp",)), True)
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
            sm.Hello(PROTOCOL_VERSION + 1, (), "3.12.0"),
            f"protocol version mismatch: the agent speaks {PROTOCOL_VERSION + 1}, "
            f"this client {PROTOCOL_VERSION}",
        ),
        (
            AGENT,
            sm.Welcome(PROTOCOL_VERSION + 1, ()),
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
        (CLIENT, sm.Ping(1), "Ping before Hello"),
        (CLIENT, sm.Opened(1), "Opened before Hello"),
        (CLIENT, sm.Welcome(PROTOCOL_VERSION, ()), "Welcome before Hello"),
        (AGENT, sm.Open(1, "192.0.2.1", 80), "Open before Welcome"),
        (AGENT, sm.Pong(1), "Pong before Welcome"),
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
    assert session.receive(sm.Error("the other end gave up")) == Step(None, True)


@pytest.mark.parametrize(
    ("role", "msg", "text"),
    [
        (CLIENT, HELLO, "Hello twice"),
        (AGENT, WELCOME, "Welcome twice"),
        (CLIENT, sm.Open(1, "192.0.2.1", 80), "unexpected Open from the agent"),
        (CLIENT, sm.GetRoutes(), "unexpected GetRoutes from the agent"),
        (AGENT, sm.Routes((), False), "unexpected Routes from the client"),
        (AGENT, sm.Opened(1), "unexpected Opened from the client"),
    ],
)
def test_after_the_greeting_only_what_the_table_lists(role: str, msg: Message, text: str) -> None:
    with pytest.raises(SessionError) as caught:
        greeted(role).receive(msg)
    assert str(caught.value) == text


@pytest.mark.parametrize("role", [CLIENT, AGENT])
def test_ping_is_answered_by_the_session_and_pong_goes_to_the_driver(role: str) -> None:
    session = greeted(role)
    assert session.receive(sm.Ping(7)) == Step(sm.Pong(7), False)
    assert session.receive(sm.Pong(8)) == Step(None, True)


# The table's answer for every stream message: the greeting is taken once, Error always,
# Ping is answered, the rest of the table goes to the driver, and anything else (the
# channel messages too: they are the Mux's) is a SessionError. Every registered stream
# message is tried, by its example, so that a new one is judged here as well.
STREAM_EXAMPLES = [EXAMPLES[REGISTRY[tag]] for tag in sorted(REGISTRY) if tag in STREAM_TAGS]


@pytest.mark.parametrize("role", [CLIENT, AGENT])
@pytest.mark.parametrize("msg", STREAM_EXAMPLES, ids=lambda msg: type(msg).__name__)
def test_every_stream_message_after_the_greeting_as_the_table_says(role: str, msg: Message) -> None:
    session = greeted(role)
    kind = type(msg)
    if kind is sm.Ping:
        assert session.receive(msg) == Step(sm.Pong(msg.cookie), False)  # type: ignore[attr-defined]
    elif kind is sm.Error or kind in TABLE[role].greeted:
        assert session.receive(msg) == Step(None, True)
    else:
        name = kind.__name__
        with pytest.raises(SessionError, match=f"^(unexpected {name} from the|{name} twice$)"):
            session.receive(msg)
    assert session.greeted

"""Firewall requests and answers: networks, session tokens and leases as firewalld gets them."""

import ipaddress
import string
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from shuttle_protocol.errors import LocalProtocolError, RemoteProtocolError
from shuttle_protocol.firewall_messages import (
    MAX_SUBNETS,
    SESSION_ID_LEN,
    HeartbeatRequest,
    OpenSessionAnswer,
    OpenSessionRequest,
    check_networks,
    check_session_id,
)
from shuttle_protocol.frames import decode_frame, encode_frame

from .strategies import networks, pack

SESSION = "0123456789abcdefABCDEF0123456789"


@pytest.mark.parametrize(
    "text",
    ["0.0.0.0/0", "10.0.0.0/8", "192.168.1.7/32", "::/0", "2001:db8::/32", "::ffff:0:0/96"],
)
def test_canonical_networks_are_accepted(text: str) -> None:
    request = OpenSessionRequest("nat", 1, (text,), (text,))
    assert request.subnets == (text,)


@given(st.lists(networks, min_size=1, max_size=20).map(tuple))
def test_networks_written_by_ipaddress_are_accepted(subnets: Any) -> None:
    request = OpenSessionRequest("nat", 65535, subnets, subnets[:1])
    assert decode_frame(encode_frame(1, request)) == (1, request)


@given(st.text(alphabet="0123456789abcdefABCDEF:./% \n\u0661", max_size=45))
@example("fe80::%eth0/64")
@example("::%x; flush ruleset/128")
@example("10.0.0.0/8")
@example("1.2.3.4/32")
@settings(max_examples=500)
def test_a_network_is_accepted_only_if_it_is_exactly_how_ipaddress_writes_it(text: str) -> None:
    try:
        check_networks((text,), "subnets")
    except LocalProtocolError:
        accepted = False
    else:
        accepted = True
    try:
        canonical = str(ipaddress.ip_network(text, strict=True)) == text
    except ValueError:
        canonical = False
    # Only the characters ipaddress prints for an unscoped network may reach firewall rules.
    harmless = set(text) <= set("0123456789abcdef:./")
    assert accepted == (canonical and harmless)


def test_one_subnet_is_required_and_excludes_may_be_empty() -> None:
    OpenSessionRequest("nat", 1, ("10.0.0.0/8",), ())
    with pytest.raises(LocalProtocolError, match="at least one subnet"):
        OpenSessionRequest("nat", 1, (), ("10.0.0.0/8",))
    with pytest.raises(RemoteProtocolError, match="at least one subnet"):
        decode_frame(pack((1, OpenSessionRequest.TAG, "nat", 1, (), ())))


def test_the_subnet_count_is_bounded() -> None:
    many = tuple(str(ipaddress.IPv4Network((n << 8, 24))) for n in range(MAX_SUBNETS + 1))
    OpenSessionRequest("nat", 1, many[:MAX_SUBNETS], ())
    with pytest.raises(LocalProtocolError):
        OpenSessionRequest("nat", 1, many, ())
    with pytest.raises(LocalProtocolError):
        OpenSessionRequest("nat", 1, many[:1], many)


@given(st.text(string.ascii_letters + string.digits, min_size=32, max_size=32))
def test_session_ids_are_32_ascii_letters_or_digits(session: str) -> None:
    check_session_id(session)
    assert HeartbeatRequest(session).session == session


@given(st.text(min_size=SESSION_ID_LEN, max_size=SESSION_ID_LEN))
def test_any_other_32_characters_are_no_session_id(session: str) -> None:
    valid = all(c in string.ascii_letters + string.digits for c in session)
    try:
        check_session_id(session)
    except LocalProtocolError:
        assert not valid
    else:
        assert valid


@pytest.mark.parametrize("lease", [0.1, 1, 30.5, 3600, 3600.0])
def test_leases_in_range_round_trip_with_their_type(lease: float) -> None:
    answer = OpenSessionAnswer(SESSION, lease)
    _, back = decode_frame(encode_frame(9, answer))
    assert back == answer
    assert isinstance(back, OpenSessionAnswer)
    assert type(back.lease) is type(lease)

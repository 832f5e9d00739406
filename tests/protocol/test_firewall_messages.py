"""Firewall requests and answers: targets, owners, methods, session tokens and leases as
firewalld gets them (the generic bad-value table is in test_messages)."""

import dataclasses
import ipaddress
import string
from typing import Any, Tuple

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from shuttle_protocol.errors import LocalProtocolError, RemoteProtocolError
from shuttle_protocol.firewall_messages import (
    ALL_PORTS,
    ANY_OWNER,
    APPLIED_METHODS,
    MAX_ID,
    MAX_PATH,
    MAX_SESSIONS,
    MAX_SHORTCUT_LIMIT,
    MAX_SHORTCUTS,
    MAX_SUBNETS,
    METHODS,
    SESSION_ID_LEN,
    BypassSocketAnswer,
    BypassSocketRequest,
    HeartbeatRequest,
    ListSessionsAnswer,
    ListSessionsRequest,
    OpenSessionAnswer,
    OpenSessionRequest,
    ReplySocketAnswer,
    ReplySocketRequest,
    SessionEntry,
    SetShortcutsAnswer,
    SetShortcutsRequest,
    SocketsAnswer,
    SocketsHandover,
    UpdateSessionRequest,
    check_address,
    check_network,
    check_session_id,
    check_targets,
)
from shuttle_protocol.frames import decode_frame, encode_frame
from shuttle_protocol.schema import Message

from .strategies import EXAMPLES, networks, pack, show, targets

SESSION = "0123456789abcdefABCDEF0123456789"
EXAMPLE = EXAMPLES[OpenSessionRequest]
assert isinstance(EXAMPLE, OpenSessionRequest)


def request(**changes: Any) -> OpenSessionRequest:
    """The example request with some fields changed, built (and checked) locally."""
    return dataclasses.replace(EXAMPLE, **changes)


def request_fields(**changes: Any) -> Tuple[Any, ...]:
    """The example request's wire fields with some changed, bypassing the checks."""
    fields = {name: getattr(EXAMPLE, name) for name in OpenSessionRequest.FIELDS}
    fields.update(changes)
    return tuple(fields[name] for name in OpenSessionRequest.FIELDS)


def receive(cls: Any, *fields: Any) -> Message:
    """Decode the fields as firewalld does when they arrive in a frame."""
    request_id, msg = decode_frame(pack((1, cls.TAG, *fields)))
    assert request_id == 1
    return msg


def round_trip(msg: Message) -> Message:
    request_id, back = decode_frame(encode_frame(7, msg))
    assert request_id == 7
    assert type(back) is type(msg)
    assert back == msg
    return back


# -- networks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "0.0.0.0/0",
        "10.0.0.0/8",
        "192.168.1.7/32",
        "::/0",
        "2001:db8::/32",
        "::fffe:0:0/96",  # next to the IPv4-mapped range, not in it
    ],
)
def test_canonical_networks_are_accepted(text: str) -> None:
    check_network(text, "subnets")
    sent = request(subnets=((text, *ALL_PORTS),), excludes=((text, 80, 80),))
    back = round_trip(sent)
    assert isinstance(back, OpenSessionRequest)
    assert back.subnets == ((text, 1, 65535),)
    assert back.excludes == ((text, 80, 80),)


@given(st.text(alphabet="0123456789abcdefABCDEF:./% \n\u0661", max_size=45))
@example("fe80::%eth0/64")
@example("::%x; flush ruleset/128")
@example("10.0.0.0/8")
@example("1.2.3.4/32")
@example("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe/127")
@settings(max_examples=500)
def test_a_network_is_accepted_only_if_it_is_exactly_how_ipaddress_writes_it(text: str) -> None:
    try:
        check_network(text, "subnets")
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
    assert accepted == (canonical and harmless and not mapped_network(text))
    # The same verdict inside a target, with any ports.
    try:
        check_targets(((text, 1, 65535),), "subnets")
    except LocalProtocolError:
        assert not accepted
    else:
        assert accepted


def mapped_network(text: str) -> bool:
    try:
        network = ipaddress.ip_network(text)
    except ValueError:
        return False
    return network.version == 6 and network.network_address.ipv4_mapped is not None


# Python 3.13 writes IPv4-mapped addresses as ::ffff:10.0.0.0, older ones in hex: a client and
# firewalld on two Pythons would not agree on the canonical text, so neither spelling passes.
@pytest.mark.parametrize("text", ["::ffff:a00:0/104", "::ffff:10.0.0.0/104", "::ffff:0:0/96"])
def test_ipv4_mapped_networks_are_refused_in_either_spelling(text: str) -> None:
    with pytest.raises(LocalProtocolError, match="IPv4-mapped: write it as IPv4"):
        check_network(text, "n")


@pytest.mark.parametrize("text", ["::ffff:a00:1", "::ffff:10.0.0.1"])
def test_ipv4_mapped_addresses_are_refused_in_either_spelling(text: str) -> None:
    with pytest.raises(LocalProtocolError, match="IPv4-mapped: write it as IPv4"):
        check_address(text, "address")


def test_the_longest_network_text_is_accepted_and_one_more_character_is_not() -> None:
    longest = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe/127"
    assert len(longest) == 43
    check_network(longest, "n")
    with pytest.raises(LocalProtocolError, match="n must be text of at most 64"):
        check_network("1" * 65, "n")
    with pytest.raises(LocalProtocolError, match="scope id"):
        check_network("fe80::%eth0/64", "n")
    with pytest.raises(LocalProtocolError, match="not written canonically"):
        check_network("2001:DB8::/32", "n")


# -- targets -------------------------------------------------------------------------------------


@given(st.lists(targets, min_size=1, max_size=20).map(tuple), st.lists(targets, max_size=20))
def test_targets_written_by_ipaddress_are_accepted(subnets: Any, excludes: Any) -> None:
    sent = request(subnets=subnets, excludes=tuple(excludes))
    assert sent.subnets == subnets
    round_trip(sent)


PORT_RANGES = [(1, 1), (1, 2), (1, 65535), (80, 80), (1024, 65535), (65534, 65535), (65535, 65535)]


@pytest.mark.parametrize("first, last", PORT_RANGES)
def test_port_ranges_are_closed_and_may_be_a_single_port(first: int, last: int) -> None:
    target = ("10.0.0.0/8", first, last)
    back = round_trip(request(subnets=(target,), excludes=(target,)))
    assert isinstance(back, OpenSessionRequest)
    assert back.subnets == (target,)
    assert all(type(port) is int for port in back.subnets[0][1:])


def test_all_ports_is_the_full_range() -> None:
    assert ALL_PORTS == (1, 65535)


# (target, what the error names): each refused when built and when received.
BAD_TARGET_CASES = [
    (("10.0.0.0/8", 443, 442), "last port must be an integer in \\[443, 65535\\]"),
    (("10.0.0.0/8", 65535, 1), "last port"),
    (("10.0.0.0/8", 2, 1), "last port"),
    (("10.0.0.0/8", 0, 80), "first port"),
    (("10.0.0.0/8", 1, 0), "last port"),
    (("10.0.0.0/8", 0, 0), "first port"),
    (("10.0.0.0/8", -1, 80), "first port"),
    (("10.0.0.0/8", 65536, 65536), "first port"),
    (("10.0.0.0/8", 1, 65536), "last port"),
    (("10.0.0.0/8", True, 80), "first port"),
    (("10.0.0.0/8", 1, True), "last port"),
    (("10.0.0.0/8", False, 80), "first port"),
    (("10.0.0.0/8", 1.0, 80), "first port"),
    (("10.0.0.0/8", "1", 80), "first port"),
    (("10.0.0.0/8", None, 80), "first port"),
    (("10.0.0.0/8", 1), "is \\[network, first port, last port\\]"),
    (("10.0.0.0/8", 1, 2, 3), "is \\[network, first port, last port\\]"),
    (("10.0.0.0/8",), "is \\[network, first port, last port\\]"),
    ((), "is \\[network, first port, last port\\]"),
    ("10.0.0.0/8", "is \\[network, first port, last port\\]"),
    (None, "is \\[network, first port, last port\\]"),
    (80, "is \\[network, first port, last port\\]"),
    ((("10.0.0.0/8", 1, 2),), "is \\[network, first port, last port\\]"),
    (("10.0.0.1/8", 1, 2), "has host bits set"),
    (("10.0.0.0/08", 1, 2), "not written canonically|does not appear|invalid"),
    (("fe80::%eth0/64", 1, 2), "scope id"),
    ((b"10.0.0.0/8", 1, 2), "must be text"),
    ((None, 1, 2), "must be text"),
    ((1, 2, 3), "must be text"),
]


@pytest.mark.parametrize("field", ["subnets", "excludes"])
@pytest.mark.parametrize(
    "target, error", BAD_TARGET_CASES, ids=[show(c[0]) for c in BAD_TARGET_CASES]
)
def test_a_bad_target_is_a_local_error_when_built_and_a_remote_one_when_received(
    field: str, target: Any, error: str
) -> None:
    good = ("192.168.0.0/16", *ALL_PORTS)
    for value in [(target,), (good, target), (target, good)]:
        with pytest.raises(LocalProtocolError, match=f"{field}.*({error})") as built:
            request(**{field: value})
        assert not isinstance(built.value, RemoteProtocolError)
        with pytest.raises(
            RemoteProtocolError, match=f"invalid OpenSessionRequest: .*{field}.*({error})"
        ):
            receive(OpenSessionRequest, *request_fields(**{field: value}))


@pytest.mark.parametrize("field", ["subnets", "excludes"])
def test_a_list_of_targets_or_a_target_list_is_refused_when_built(field: str) -> None:
    # Lists never arrive from msgpack (arrays decode as tuples); only a local caller has them.
    for value in [[("10.0.0.0/8", 1, 2)], (["10.0.0.0/8", 1, 2],), "10.0.0.0/8", None]:
        with pytest.raises(LocalProtocolError, match=field):
            request(**{field: value})


@given(
    st.one_of(networks, st.sampled_from(["10.0.0.1/8", "", "x", "::%a/1"])),
    st.one_of(st.integers(-2, 65537), st.sampled_from([0, 1, 65534, 65535, 65536])),
    st.one_of(st.integers(-2, 65537), st.sampled_from([0, 1, 65534, 65535, 65536])),
)
@settings(max_examples=300)
def test_a_target_is_accepted_exactly_when_1_le_first_le_last_le_65535(
    text: str, first: int, last: int
) -> None:
    try:
        check_network(text, "n")
    except LocalProtocolError:
        network_ok = False
    else:
        network_ok = True
    expected = network_ok and 1 <= first <= last <= 65535
    fields = request_fields(subnets=((text, first, last),))
    try:
        OpenSessionRequest(*fields)
    except LocalProtocolError:
        assert not expected
        with pytest.raises(RemoteProtocolError):
            receive(OpenSessionRequest, *fields)
    else:
        assert expected
        assert receive(OpenSessionRequest, *fields) == OpenSessionRequest(*fields)


def test_one_subnet_is_required_and_excludes_may_be_empty() -> None:
    request(subnets=(("10.0.0.0/8", 1, 65535),), excludes=())
    with pytest.raises(LocalProtocolError, match="at least one subnet"):
        request(subnets=(), excludes=(("10.0.0.0/8", 1, 65535),))
    with pytest.raises(RemoteProtocolError, match="at least one subnet"):
        receive(OpenSessionRequest, *request_fields(subnets=(), excludes=()))


def test_the_target_count_is_bounded() -> None:
    many = tuple((f"{n >> 8}.{n & 255}.0.0/16", 1, 65535) for n in range(MAX_SUBNETS + 1))
    request(subnets=many[:MAX_SUBNETS], excludes=many[:MAX_SUBNETS])
    with pytest.raises(LocalProtocolError, match="subnets must be a list of at most 50000"):
        request(subnets=many)
    with pytest.raises(LocalProtocolError, match="excludes must be a list of at most 50000"):
        request(excludes=many)


# -- owners and forward --------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["uid", "gid"])
@pytest.mark.parametrize("value", [ANY_OWNER, 0, 1, 1000, 2**31, MAX_ID])
def test_owners_from_any_to_the_largest_id_round_trip(field: str, value: int) -> None:
    back = round_trip(request(**{field: value}))
    assert getattr(back, field) == value
    assert type(getattr(back, field)) is int


def test_any_owner_is_minus_one_and_the_largest_id_is_below_uid_t_minus_one() -> None:
    assert ANY_OWNER == -1
    assert MAX_ID == 2**32 - 2


@pytest.mark.parametrize("field", ["uid", "gid"])
@pytest.mark.parametrize(
    "value", [-2, MAX_ID + 1, 2**32, -(2**31), 2**64 - 1, True, False, -1.0, 0.0, "0", None]
)
def test_owners_outside_the_range_are_refused_on_both_ends(field: str, value: Any) -> None:
    with pytest.raises(
        LocalProtocolError, match=f"{field} must be an integer in \\[-1, {MAX_ID}\\]"
    ):
        request(**{field: value})
    with pytest.raises(RemoteProtocolError, match=f"invalid OpenSessionRequest: {field} must"):
        receive(OpenSessionRequest, *request_fields(**{field: value}))


@pytest.mark.parametrize("forward", [True, False])
def test_forward_is_a_bool_and_comes_back_as_one(forward: bool) -> None:
    back = round_trip(request(forward=forward))
    assert isinstance(back, OpenSessionRequest)
    assert back.forward is forward


@pytest.mark.parametrize("value", [1, 0, -1, 2, 1.0, 0.0, "true", "", b"\x01", None, ()], ids=show)
def test_forward_refuses_everything_but_true_and_false(value: Any) -> None:
    with pytest.raises(LocalProtocolError, match="forward must be true or false"):
        request(forward=value)
    with pytest.raises(RemoteProtocolError, match="invalid OpenSessionRequest: forward must"):
        receive(OpenSessionRequest, *request_fields(forward=value))


# -- methods -------------------------------------------------------------------------------------


def test_methods_auto_is_asked_for_and_never_applied() -> None:
    assert METHODS == ("auto", "nat", "nft", "tproxy")
    assert APPLIED_METHODS == ("nat", "nft", "tproxy")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_may_be_asked_for(method: str) -> None:
    back = round_trip(request(method=method))
    assert isinstance(back, OpenSessionRequest)
    assert back.method == method


@pytest.mark.parametrize("method", APPLIED_METHODS)
def test_the_answer_names_the_applied_method(method: str) -> None:
    back = round_trip(OpenSessionAnswer(SESSION, 30, method))
    assert isinstance(back, OpenSessionAnswer)
    assert back.method == method


@pytest.mark.parametrize("method", ["auto", "TPROXY", "NFT", "", b"nft", None, 1, True])
def test_the_answer_refuses_any_other_method_on_both_ends(method: Any) -> None:
    with pytest.raises(LocalProtocolError, match="method must be one of nat, nft, tproxy"):
        OpenSessionAnswer(SESSION, 30, method)
    with pytest.raises(RemoteProtocolError, match="invalid OpenSessionAnswer: method must"):
        receive(OpenSessionAnswer, SESSION, 30, method)


@pytest.mark.parametrize("method", ["tproxy ", "AUTO", "nft ", "", b"nat", None, 0, True])
def test_the_request_refuses_unknown_methods_on_both_ends(method: Any) -> None:
    with pytest.raises(LocalProtocolError, match="method must be one of auto, nat, nft, tproxy"):
        request(method=method)
    with pytest.raises(RemoteProtocolError, match="invalid OpenSessionRequest: method must"):
        receive(OpenSessionRequest, *request_fields(method=method))


def test_the_old_four_field_request_and_two_field_answer_are_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="takes 8 fields, got 4"):
        receive(OpenSessionRequest, "nat", 12300, ("10.0.0.0/8",), ())
    with pytest.raises(RemoteProtocolError, match="takes 3 fields, got 2"):
        receive(OpenSessionAnswer, SESSION, 30.0)


# -- sessions and leases -------------------------------------------------------------------------


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
    answer = OpenSessionAnswer(SESSION, lease, "nat")
    back = round_trip(answer)
    assert isinstance(back, OpenSessionAnswer)
    assert type(back.lease) is type(lease)


# -- tproxy: sockets, reply sockets, the handover ------------------------------------------------


@pytest.mark.parametrize(
    "text", ["10.0.0.1", "0.0.0.0", "255.255.255.255", "2001:db8::7", "::", "::1", "fd00:5e::5"]
)
def test_canonical_addresses_are_accepted(text: str) -> None:
    program = "::1" if ":" in text else "127.0.0.1"
    back = round_trip(ReplySocketRequest(SESSION, text, 53, program, 40000))
    assert isinstance(back, ReplySocketRequest)
    assert back.address == text


@pytest.mark.parametrize(("address", "program"), [("10.0.0.1", "::1"), ("fd00:5e::5", "10.0.0.2")])
def test_a_reply_socket_and_its_program_are_of_one_ip_version(address: str, program: str) -> None:
    with pytest.raises(LocalProtocolError, match="must be of one IP version"):
        ReplySocketRequest(SESSION, address, 53, program, 40000)


@given(st.text(alphabet="0123456789abcdefABCDEF:./% \n\u0661", max_size=46))
@example("fe80::1%eth0")
@example("1.2.3.4")
@example("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255")
@settings(max_examples=500)
def test_an_address_is_accepted_only_if_it_is_exactly_how_ipaddress_writes_it(text: str) -> None:
    try:
        check_address(text, "address")
    except LocalProtocolError:
        accepted = False
    else:
        accepted = True
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        canonical = mapped = False
    else:
        canonical = str(address) == text
        mapped = address.version == 6 and address.ipv4_mapped is not None
    assert accepted == (canonical and not mapped and set(text) <= set("0123456789abcdef:."))


def test_the_longest_address_text_is_accepted() -> None:
    longest = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    check_address(longest, "address")
    with pytest.raises(LocalProtocolError, match="address must be text of at most 45"):
        check_address("1" * 46, "address")


@pytest.mark.parametrize("kinds", [("reply",), ("tcp4", "udp4"), ("tcp6", "udp6", "tcp4", "udp4")])
def test_socket_kinds_round_trip_in_their_order(kinds: Tuple[str, ...]) -> None:
    back = round_trip(SocketsHandover(kinds))
    assert isinstance(back, SocketsHandover)
    assert back.kinds == kinds


def test_duplicate_kinds_are_refused_on_both_ends() -> None:
    with pytest.raises(LocalProtocolError, match="kinds must be distinct"):
        SocketsHandover(("tcp4", "tcp4"))
    with pytest.raises(RemoteProtocolError, match="invalid SocketsHandover: kinds must be"):
        receive(SocketsHandover, ("udp4", "udp4"))


@pytest.mark.parametrize("length", [1, 50, MAX_PATH])
def test_socket_paths_up_to_the_unix_limit(length: int) -> None:
    path = "/" + "p" * (length - 1)
    assert round_trip(SocketsAnswer(SESSION, path, 1)) == SocketsAnswer(SESSION, path, 1)
    with pytest.raises(LocalProtocolError, match="path must be"):
        ReplySocketAnswer(SESSION, path + "p" * (MAX_PATH + 1 - length))


def test_the_token_is_named_as_such() -> None:
    with pytest.raises(LocalProtocolError, match=r"^token must be a 32-character token$"):
        SocketsAnswer("a" * 31 + "-", "/run/x", 1)
    with pytest.raises(RemoteProtocolError, match="invalid ReplySocketAnswer: token must"):
        receive(ReplySocketAnswer, "a" * 33, "/run/x")


# -- ListSessions and UpdateSession ------------------------------------------------------------

ENTRY = SessionEntry("0123456789ab", 0, "tproxy", 41000, 1, 0, 2, 12, -1, -1, False, 0, 6.0, 0)


def test_a_listed_session_keeps_its_field_names_across_the_wire() -> None:
    back = round_trip(ListSessionsAnswer((ENTRY, ENTRY._replace(session="ba9876543210"))))
    assert isinstance(back, ListSessionsAnswer)
    assert [type(entry) for entry in back.sessions] == [SessionEntry, SessionEntry]
    assert [entry.session for entry in back.sessions] == ["0123456789ab", "ba9876543210"]
    assert back.sessions[0].nameservers == 2


def test_entries_arrive_as_plain_lists_and_are_named_on_arrival() -> None:
    msg = receive(ListSessionsAnswer, (tuple(ENTRY),))
    assert isinstance(msg, ListSessionsAnswer)
    assert msg.sessions == (ENTRY,)
    assert msg.sessions[0].method == "tproxy"


def test_no_session_is_a_valid_list_and_the_count_is_bounded() -> None:
    assert round_trip(ListSessionsAnswer(())) == ListSessionsAnswer(())
    assert len(ListSessionsAnswer((ENTRY,) * MAX_SESSIONS).sessions) == MAX_SESSIONS
    with pytest.raises(LocalProtocolError, match=f"at most {MAX_SESSIONS} items"):
        ListSessionsAnswer((ENTRY,) * (MAX_SESSIONS + 1))


def test_list_sessions_asks_nothing_more() -> None:
    assert round_trip(ListSessionsRequest()) == ListSessionsRequest()
    with pytest.raises(RemoteProtocolError, match="takes 0 fields, got 1"):
        receive(ListSessionsRequest, 1000)  # a uid to list: the kernel says whose


def test_an_update_keeps_a_subnet_and_bounds_both_lists() -> None:
    subnets = (("10.0.0.0/8", *ALL_PORTS),)
    assert round_trip(UpdateSessionRequest(SESSION, subnets, ())) == UpdateSessionRequest(
        SESSION, subnets, ()
    )
    with pytest.raises(LocalProtocolError, match="at least one subnet"):
        UpdateSessionRequest(SESSION, (), subnets)
    with pytest.raises(RemoteProtocolError, match="invalid UpdateSessionRequest: excludes must"):
        receive(UpdateSessionRequest, SESSION, subnets, subnets * (MAX_SUBNETS + 1))


@pytest.mark.parametrize("kind", ["udp4", "udp6", "tcp4", "tcp6"])
def test_a_bypass_socket_is_asked_for_by_kind(kind: str) -> None:
    round_trip(BypassSocketRequest(SESSION, kind))
    round_trip(BypassSocketAnswer(SESSION, "/run/shuttle/fd.sock"))


@pytest.mark.parametrize("kind", ["reply", "tcp", "udp5", "", 4, None])
def test_any_other_bypass_kind_is_refused_on_both_ends(kind: Any) -> None:
    with pytest.raises(LocalProtocolError):
        BypassSocketRequest(SESSION, kind)
    with pytest.raises(RemoteProtocolError):
        receive(BypassSocketRequest, SESSION, kind)


# -- SetShortcuts ------------------------------------------------------------------------------


def test_shortcuts_are_set_as_the_client_builds_them_and_cleared_with_none() -> None:
    asked = SetShortcutsRequest(SESSION, (("10.1.0.2", 7007, 40123),), 200)
    assert round_trip(asked) == asked
    assert round_trip(SetShortcutsRequest(SESSION, (), 1)).shortcuts == ()
    assert round_trip(SetShortcutsAnswer(5)) == SetShortcutsAnswer(5)


def test_shortcuts_and_their_limit_are_bounded() -> None:
    many = tuple(("10.1.0.2", port, 40000) for port in range(1, MAX_SHORTCUTS + 1))
    assert len(SetShortcutsRequest(SESSION, many, MAX_SHORTCUT_LIMIT).shortcuts) == MAX_SHORTCUTS
    with pytest.raises(LocalProtocolError, match=f"at most {MAX_SHORTCUTS} items"):
        SetShortcutsRequest(SESSION, (*many, ("10.1.0.3", 1, 40000)), 1)
    with pytest.raises(RemoteProtocolError, match="invalid SetShortcutsRequest: limit must"):
        receive(SetShortcutsRequest, SESSION, (), MAX_SHORTCUT_LIMIT + 1)


@pytest.mark.parametrize(
    ("shortcut", "complaint"),
    [
        (("10.1.0.0/16", 7007, 40123), "shortcut address: "),  # a network, not an address
        (("::ffff:10.1.0.2", 7007, 40123), "is IPv4-mapped"),
        (("10.1.0.2", 0, 40123), "shortcut port must be"),
        (("10.1.0.2", 7007, 65536), "shortcut local port must be"),
        (("10.1.0.2", 7007), r"\[address, port, local port\]"),
    ],
)
def test_a_bad_shortcut_is_refused_on_both_ends(shortcut: Any, complaint: str) -> None:
    with pytest.raises(LocalProtocolError, match=complaint):
        SetShortcutsRequest(SESSION, (shortcut,), 1)
    with pytest.raises(RemoteProtocolError, match=complaint):
        receive(SetShortcutsRequest, SESSION, (shortcut,), 1)


def test_one_destination_has_one_shortcut() -> None:
    # The same local port twice is the caller's own business: its traffic, its forwards.
    SetShortcutsRequest(SESSION, (("10.1.0.2", 7007, 40123), ("10.1.0.3", 7007, 40123)), 1)
    with pytest.raises(LocalProtocolError, match="distinct"):
        SetShortcutsRequest(SESSION, (("10.1.0.2", 7007, 40123), ("10.1.0.2", 7007, 40124)), 1)

"""Questions to the agent: what the client makes of routes, and answers nobody asked for."""

import asyncio
import ipaddress
import logging
from typing import List, Tuple

import pytest
from shuttle_client import discovery
from shuttle_client.discovery import Discovery, DiscoveryError, routed_targets
from shuttle_ends.relay import Link
from shuttle_protocol.firewall_messages import ALL_PORTS
from shuttle_protocol.mux import CLIENT, Mux
from shuttle_protocol.stream_messages import Hosts, Nameservers, Routes

from .agents import RecordingPipe


def test_routed_targets_leave_out_what_is_never_remote() -> None:
    networks = [
        "0.0.0.0/0",
        "::/0",
        "10.2.0.0/16",
        "127.0.0.0/8",
        "::1/128",
        "169.254.0.0/16",
        "fe80::/64",
        "ff00::/8",
        "224.0.0.0/4",
        "2001:db8:2::/48",
        "10.2.0.0/16",
        "192.0.2.7/32",
    ]
    assert routed_targets(networks) == (
        ("10.2.0.0/16", *ALL_PORTS),
        ("2001:db8:2::/48", *ALL_PORTS),
        ("192.0.2.7/32", *ALL_PORTS),
    )


def test_short_routes_and_routes_over_this_hosts_links_are_not_captured(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="shuttle")
    own = [ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("fd00:1::/64")]
    networks = [
        "0.0.0.0/1",
        "128.0.0.0/1",
        "::/1",
        "8000::/1",
        "2000::/3",
        "10.0.0.0/8",  # as short as may be
        "172.0.0.0/7",
        "2001::/16",
        "192.168.0.0/16",  # covers this host's network
        "192.168.1.128/25",  # inside it
        "fd00:1::/48",
        "fd00:2::/48",
    ]
    assert routed_targets(networks, own) == (
        ("10.0.0.0/8", *ALL_PORTS),
        ("2001::/16", *ALL_PORTS),
        ("fd00:2::/48", *ALL_PORTS),
    )
    (line,) = [r.getMessage() for r in caplog.records if "not capturing" in r.getMessage()]
    # 0.0.0.0/1 and ::/1 go without a word, as "this network" (unspecified) always did.
    assert line.startswith("not capturing 7 of the server's routes: 128.0.0.0/1 (shorter than /8)")
    assert "8000::/1 (shorter than /16)" in line
    assert "192.168.0.0/16 (overlaps this host's 192.168.1.0/24)" in line
    assert "fd00:1::/48 (overlaps this host's fd00:1::/64)" in line
    # A network the command line gives is captured, whatever the rules say.
    given = [("128.0.0.0/1", *ALL_PORTS), ("192.168.1.128/25", 80, 80)]
    assert routed_targets(["128.0.0.0/1", "192.168.1.128/25", "8000::/1"], own, given) == (
        ("128.0.0.0/1", *ALL_PORTS),
        ("192.168.1.128/25", *ALL_PORTS),
    )


def test_own_networks_are_this_hosts_links() -> None:
    own = discovery.own_networks()
    # This host's loopback is on a link of its own (the local table), and the default
    # route, through a gateway, is on none.
    assert ipaddress.ip_network("::1/128") in own
    assert ipaddress.ip_network("0.0.0.0/0") not in own


def new_discovery() -> Tuple[Discovery, List[str]]:
    """Discovery on a link whose pipe records; the link's failures, as they come."""
    failures: List[str] = []
    link = Link(Mux(CLIENT), lambda msg: None, "agent")
    link.attach_writer(RecordingPipe())  # type: ignore[arg-type]
    link.fail = failures.append  # type: ignore[method-assign]
    return Discovery(link), failures


@pytest.mark.parametrize(
    "answer",
    [Routes(("10.0.0.0/8",), False), Nameservers(("10.0.0.53",)), Hosts((("db1", "10.0.0.7"),))],
)
def test_an_answer_nobody_asked_for_fails_the_link(answer: object) -> None:
    async def scenario() -> None:
        questions, failures = new_discovery()
        assert questions.on_message(answer)  # type: ignore[arg-type]
        assert failures and "did not ask" in failures[0]

    asyncio.run(scenario())


def test_routes_add_up_until_the_last_message() -> None:
    async def scenario() -> None:
        questions, failures = new_discovery()
        asking = asyncio.ensure_future(questions.routes())
        await asyncio.sleep(0)
        questions.on_message(Routes(("10.1.0.0/16",), True))
        questions.on_message(Routes(("10.2.0.0/16", "2001:db8::/32"), False))
        assert await asking == ("10.1.0.0/16", "10.2.0.0/16", "2001:db8::/32")
        assert failures == []

    asyncio.run(scenario())


def test_host_names_are_reported_all_so_far_each_time_new_ones_come() -> None:
    async def scenario() -> None:
        questions, failures = new_discovery()
        seen: List[Tuple[Tuple[str, str], ...]] = []
        questions.watch_hosts(("db1",), seen.append)
        questions.on_message(Hosts((("db1", "10.0.0.7"),)))
        questions.on_message(Hosts((("db1", "10.0.0.7"),)))  # nothing new: no call
        questions.on_message(Hosts((("web", "10.0.0.8"),)))
        assert seen == [(("db1", "10.0.0.7"),), (("db1", "10.0.0.7"), ("web", "10.0.0.8"))]
        assert failures == []

    asyncio.run(scenario())


def test_no_answer_in_time_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "ANSWER_TIMEOUT", 0.05)

    async def scenario() -> None:
        questions, _ = new_discovery()
        with pytest.raises(DiscoveryError, match="did not report its nameservers"):
            await questions.nameservers()

    asyncio.run(scenario())

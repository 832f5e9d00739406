"""Questions to the agent: what the client makes of routes, and answers nobody asked for."""

import asyncio
from typing import List, Tuple

import pytest
from shuttle_agent.relay import Link
from shuttle_client import discovery
from shuttle_client.discovery import Discovery, DiscoveryError, routed_targets
from shuttle_protocol.firewall_messages import ALL_PORTS
from shuttle_protocol.mux import CLIENT, Mux
from shuttle_protocol.stream_messages import Hosts, Nameservers, Routes

from .test_udp import RecordingPipe


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

"""The control table over a running client whose firewall session is lost (firewalld
restarted) and being opened again: status says so, and route changes wait for it."""

from __future__ import annotations

import asyncio

import pytest
from shuttle_client.cli import parse_args
from shuttle_client.control import RequestRefused
from shuttle_client.control_requests import Running, handler
from shuttle_client.firewall_session import FirewallSession
from shuttle_client.streams import Streams
from shuttle_protocol.control_messages import AddRoutesRequest, StatusAnswer, StatusRequest

SUBNET = ("10.30.0.0/16", 1, 65535)


async def ask_while_lost() -> tuple[StatusAnswer, str]:
    options = parse_args(["-r", "server", "10.0.0.0/8"])
    client = Running(options, Streams(options), FirewallSession("/nonexistent"), print)
    client.ready = True
    client.firewall_lost = True
    handle = handler(client)
    status = await handle(StatusRequest())
    assert isinstance(status, StatusAnswer)
    with pytest.raises(RequestRefused) as refused:
        await handle(AddRoutesRequest((SUBNET,), ()))
    return status, str(refused.value)


def test_a_lost_firewall_session_shows_in_status_and_holds_route_changes() -> None:
    status, refused = asyncio.run(ask_while_lost())
    assert status.state == "firewall-lost"
    assert refused == "the firewall session is lost and being opened again: try later"

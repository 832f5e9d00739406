"""What every firewall method promises behind the one interface (methods/base.py), tested
once and run for each method: the probe works on this kernel and leaves nothing; real
traffic in a namespace is captured as asked, DNS to the nameservers too, and follows an
update, and a session's shortcuts take what they should (nat and nft; tproxy captures for a
client of another uid, in test_tproxy.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from shuttle_firewalld.methods.nft import NftMethod
from shuttle_firewalld.methods.tools import run_tool
from shuttle_firewalld.methods.tproxy import TproxyMethod

from firewalld.captures import (
    check_capture,
    check_dns_capture,
    check_shortcut_refusals,
    check_shortcuts,
    check_shortcuts_update,
    check_update,
)
from firewalld.daemon import Daemon, Listener, nft

pytestmark = pytest.mark.integration

REDIRECTING = ["nat", "nft"]


@pytest.mark.parametrize("method", [NftMethod, TproxyMethod], ids=["nft", "tproxy"])
def test_the_probe_works_on_this_kernel(
    netns: str, method: type[NftMethod] | type[TproxyMethod]
) -> None:
    """The experiment behind the method works here: concatenated interval sets and inet nat
    (nft); a chain that marks and a tproxy rule per IP version, and the ip tool (tproxy)."""

    def in_netns(argv: Sequence[str], stdin: str) -> str:
        return run_tool(["ip", "netns", "exec", netns, *argv], stdin)

    assert method(in_netns).probe() is None
    assert "shuttle" not in nft(netns, "list", "tables")


@pytest.mark.parametrize("method", REDIRECTING)
def test_traffic_is_captured_as_asked(
    routed: str,
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
    method: str,
) -> None:
    check_capture(routed, start_firewalld(), listen, method)


@pytest.mark.parametrize("method", REDIRECTING)
def test_dns_to_the_nameservers_is_captured(
    dns_net: str,
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
    method: str,
) -> None:
    check_dns_capture(dns_net, start_firewalld(), listen, method)


@pytest.mark.parametrize("method", REDIRECTING)
def test_traffic_follows_an_update(
    routed: str,
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
    method: str,
) -> None:
    check_update(routed, start_firewalld(lease=30), listen, method)


@pytest.mark.parametrize("method", REDIRECTING)
def test_a_shortcut_takes_connections_up_to_its_limit(
    routed: str, start_firewalld: Callable[..., Daemon], method: str
) -> None:
    check_shortcuts(routed, start_firewalld(lease=30), method)


@pytest.mark.parametrize("method", REDIRECTING)
def test_a_refused_shortcut_changes_no_rule(
    routed: str,
    start_firewalld: Callable[..., Daemon],
    listen: Callable[..., Listener],
    method: str,
) -> None:
    check_shortcut_refusals(routed, start_firewalld(lease=30), listen, method)


@pytest.mark.parametrize("method", REDIRECTING)
def test_an_update_keeps_the_shortcuts_it_still_captures(
    routed: str, start_firewalld: Callable[..., Daemon], method: str
) -> None:
    check_shortcuts_update(routed, start_firewalld(lease=30), method)

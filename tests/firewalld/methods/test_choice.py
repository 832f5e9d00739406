"""Which method a session gets: the table of choices, auto's preference, the refusals."""

from __future__ import annotations

import pytest
from shuttle_firewalld.errors import RequestError
from shuttle_firewalld.methods.choice import PREFERENCE, choose

KNOWN = ("nat", "nft")
NFT_BROKEN = {"nft": "nft failed (exit 1): Error: Could not process rule: No such file"}


@pytest.mark.parametrize(
    ("requested", "broken", "chosen"),
    [
        ("auto", {}, "nft"),
        ("auto", NFT_BROKEN, "nat"),
        ("nft", {}, "nft"),
        ("nat", {}, "nat"),
        ("nat", NFT_BROKEN, "nat"),
    ],
)
def test_choices(requested: str, broken: dict[str, str], chosen: str) -> None:
    assert choose(requested, KNOWN, broken) == chosen


def test_auto_prefers_nft() -> None:
    assert PREFERENCE == ("nft", "nat")


def test_a_broken_method_asked_for_by_name_is_refused_with_the_reason() -> None:
    with pytest.raises(RequestError) as refused:
        choose("nft", KNOWN, NFT_BROKEN)
    assert str(refused.value) == (
        "the nft method does not work on this host "
        "(nft failed (exit 1): Error: Could not process rule: No such file); "
        "ask for auto to get one that does"
    )


def test_auto_with_nothing_working() -> None:
    broken = {**NFT_BROKEN, "nat": "iptables-restore failed"}
    with pytest.raises(RequestError, match=r"^no firewall method works on this host \(nft: "):
        choose("auto", KNOWN, broken)


def test_a_method_this_firewalld_lacks() -> None:
    with pytest.raises(RequestError, match=r"^unknown method 'nft'$"):
        choose("nft", ("nat",), {})
    assert choose("auto", ("nat",), {}) == "nat"


def test_auto_never_means_tproxy() -> None:
    # A client must be built for tproxy (it gets sockets instead of listening itself).
    known = ("nat", "nft", "tproxy")
    assert choose("auto", known, {}) == "nft"
    assert choose("tproxy", known, {}) == "tproxy"
    broken = {**NFT_BROKEN, "nat": "iptables-restore failed"}
    with pytest.raises(RequestError, match="no firewall method works on this host"):
        choose("auto", known, broken)

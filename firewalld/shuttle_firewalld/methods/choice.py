"""Which method a session gets: the one it asks for, or for "auto" the first that works here.

Whether a method works is found out once, at start (see NftMethod.probe); the choice itself
is this one pure function.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from shuttle_firewalld.errors import RequestError

# auto's order of preference: nft keeps one table per session with the subnets in sets (a
# constant number of rules); nat needs a rule per subnet, but runs where nft cannot. Never
# tproxy: its client does not listen but fetches sockets, so it must ask for it by name.
PREFERENCE = ("nft", "nat")


def choose(requested: str, known: Collection[str], broken: Mapping[str, str]) -> str:
    """The method to apply; RequestError naming why if the one asked for does not work.

    known: the methods this firewalld has; broken: those that do not work here, and why.
    """
    if requested == "auto":
        for name in PREFERENCE:
            if name in known and name not in broken:
                return name
        reasons = "; ".join(f"{name}: {broken[name]}" for name in PREFERENCE if name in broken)
        raise RequestError(f"no firewall method works on this host ({reasons})")
    if requested not in known:
        raise RequestError(f"unknown method {requested!r:.40}")
    if requested in broken:
        raise RequestError(
            f"the {requested} method does not work on this host ({broken[requested]}); "
            "ask for auto to get one that does"
        )
    return requested

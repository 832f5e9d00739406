"""A member of firewalld's group that tries to abuse tproxy reply sockets, for tests.

Run as that member (`python reply_attacker.py JSON`, JSON naming firewalld's socket and the
addresses below): it opens a tproxy session of its own on everything (0.0.0.0/0 and ::/0,
no policy needed for its own uid), finds the victim's program in /proc/net/udp (a wildcard
UDP socket of the victim's uid), and tries each attack, through the real client library:

- a reply socket for the victim's flow (the victim's program as its program);
- reply sockets at a broadcast address and at network addresses;
- a reply socket at a privileged port of an address that is not its own, for a flow of its
  own program, sending to the outside host and to the victim's program (and, to show the
  socket works, to its own program);
- a reply socket at the victim's flow's destination, connected to the victim's program: it
  sends there, takes the fences off if it can, and reads what comes.

It prints "ready" before the victim's next datagram is due, waits for a line on stdin, and
then prints one JSON object: what came of each attempt.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from typing import Any, Union

from shuttle_client.firewall_session import FirewallError, FirewallSession

Outcome = Union[str, Any]
SO_DETACH_FILTER = 27  # <asm-generic/socket.h>


def victims_program(uid: int) -> tuple[str, int]:
    """The victim's program as /proc/net/udp shows it: the wildcard socket of uid."""
    with open("/proc/net/udp", encoding="ascii") as table:
        for line in table.read().splitlines()[1:]:
            fields = line.split()
            address, _, port = fields[1].partition(":")
            if fields[7] == str(uid) and address == "00000000":
                return address, int(port, 16)
    raise SystemExit(f"no UDP socket of uid {uid}")


def sent(sock: socket.socket, payload: bytes, to: tuple[str, int] | None = None) -> str:
    """ "sent", or why not (nft's drop says EPERM)."""
    try:
        if to is None:
            sock.send(payload)
        else:
            sock.sendto(payload, to)
    except OSError as exc:
        return exc.strerror or str(exc)
    return "sent"


async def attack(given: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    client = FirewallSession(given["socket"])
    await client.open("tproxy", 1, ["0.0.0.0/0", "::/0"], [])
    try:
        _, listeners = await client.tproxy_sockets()
        for listener in listeners.values():
            listener.close()
        victim = (given["program"], victims_program(given["victim_uid"])[1])
        destination = (given["destination"], given["port"])
        mine = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        mine6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        mine.bind(("0.0.0.0", 0))  # noqa: S104  (as a program does: the wildcard, in a test netns)
        mine6.bind(("::", 0))
        own = (given["program"], mine.getsockname()[1])
        own6 = (given["program6"], mine6.getsockname()[1])

        async def attempt(address: str, port: int, program: tuple[str, int]) -> str:
            try:
                (await client.reply_socket(address, port, program)).close()
            except FirewallError as exc:
                return str(exc)
            return "made"

        results["victims flow"] = await attempt(*destination, victim)
        results["broadcast"] = await attempt(given["broadcast"], 53, own)
        results["network"] = await attempt(given["network"], 53, own)
        results["network6"] = await attempt(given["network6"], 53, own6)
        spoofer = await client.reply_socket(given["spoofed"], 53, own)
        spoofer6 = await client.reply_socket(given["spoofed6"], 53, own6)
        results["sent"] = {
            "outside": sent(spoofer, b"spoof", (given["outside"], 7)),
            "victim": sent(spoofer, b"spoof", victim),
            "outside6": sent(spoofer6, b"spoof", (given["outside6"], 7)),
            "own": sent(spoofer, b"spoof", own),
            "own6": sent(spoofer6, b"spoof", own6),
        }
        mine.settimeout(5)
        mine6.settimeout(5)
        results["own"] = [mine.recvfrom(100)[1][:2], mine6.recvfrom(100)[1][:2]]
        thief = await client.reply_socket(*destination, own)
        thief.connect(victim)
        fences = []
        for option, value in (
            (socket.SO_BINDTODEVICE, b""),
            (socket.SO_MARK, 0),
            (SO_DETACH_FILTER, 0),
        ):
            try:
                thief.setsockopt(socket.SOL_SOCKET, option, value)
                fences.append("changed")
            except OSError as exc:
                fences.append(exc.strerror or str(exc))
        results["fences"] = fences
        results["hijack"] = sent(thief, b"hijack")
        print("ready", flush=True)
        sys.stdin.readline()  # the victim's datagram went meanwhile
        thief.settimeout(2)
        try:
            results["stolen"] = thief.recv(100).decode()
        except OSError as exc:
            results["stolen"] = str(exc)
    finally:
        await client.close()
    return results


if __name__ == "__main__":
    print(json.dumps(asyncio.run(attack(json.loads(sys.argv[1])))), flush=True)

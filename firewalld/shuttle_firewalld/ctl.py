"""`shuttle-firewalld ctl`: what a running firewalld holds, for admins and scripts, asked over
its own socket like any client (so a caller sees its own sessions, and root sees all)."""

from __future__ import annotations

import grp
import json
import os
from typing import IO

import zmq
from shuttle_protocol.firewall_messages import (
    ANY_OWNER,
    PAIRS,
    ListSessionsAnswer,
    ListSessionsRequest,
    SessionEntry,
)
from shuttle_protocol.rpc import AnswerError, Caller

TIMEOUT = 5.0  # seconds to wait for the answer: firewalld answers a list at once


class CtlError(Exception):
    """The command cannot do its job; str() is one line for the user."""


def list_sessions(path: str, timeout: float = TIMEOUT) -> tuple[SessionEntry, ...]:
    """The sessions firewalld at path shows the calling uid; CtlError if it cannot say."""
    _check_reachable(path)
    call = Caller(PAIRS).call(ListSessionsRequest(), ListSessionsAnswer)
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    try:
        # libzmq connects in the background and never says it failed: the poll bounds it.
        dealer.connect("ipc://" + path)
        dealer.send(call.frame())
        if not dealer.poll(int(timeout * 1000)):
            raise CtlError(
                f"no answer from shuttle-firewalld at {path} within {timeout:g} s: is it running?"
            )
        data = dealer.recv()
    except zmq.ZMQError as exc:
        raise CtlError(f"cannot talk to shuttle-firewalld at {path}: {exc}") from None
    finally:
        dealer.close()
        context.term()
    try:
        answer = call.receive(data)
    except AnswerError as exc:
        raise CtlError(exc.from_peer("shuttle-firewalld")) from None
    if answer is None:  # a fresh connection has no earlier request to answer
        raise CtlError("shuttle-firewalld answered another request than ours")
    return answer.sessions


def _check_reachable(path: str) -> None:
    """What libzmq cannot tell: no socket there, or no right to use it."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        raise CtlError(
            f"cannot reach shuttle-firewalld at {path}: is it running? (no such socket)"
        ) from None
    except PermissionError:
        raise CtlError(
            f"permission denied on {path}: a directory on the way is closed to you"
        ) from None
    except OSError as exc:
        raise CtlError(f"cannot reach shuttle-firewalld at {path}: {exc.strerror}") from None
    if not os.access(path, os.R_OK | os.W_OK):
        try:
            group = grp.getgrgid(found.st_gid).gr_name
        except KeyError:
            group = str(found.st_gid)
        raise CtlError(
            f"permission denied on {path}: only root and members of group {group} may connect"
        )


def scope(entry: SessionEntry) -> str:
    """Whose traffic the session captures, in a few words."""
    text = "every uid" if entry.uid == ANY_OWNER else f"uid {entry.uid}"
    if entry.gid != ANY_OWNER:
        text += f" gid {entry.gid}"
    return text + (" +forward" if entry.forward else "")


def duration(seconds: float) -> str:
    """Seconds as 42s, 12m05s or 3h02m."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


COLUMNS = (
    "SESSION",
    "OWNER",
    "METHOD",
    "PORT",
    "SUBNETS",
    "EXCLUDES",
    "DNS",
    "RULES",
    "SCOPE",
    "OPENED",
    "LEASE",
    "HOSTS",
)


def table(entries: tuple[SessionEntry, ...]) -> str:
    """The sessions as a table with a header line, one line each; a line saying so for none."""
    if not entries:
        return "no sessions\n"
    rows = [COLUMNS] + [
        (
            entry.session,
            str(entry.caller),
            entry.method,
            str(entry.port),
            str(entry.subnets),
            str(entry.excludes),
            str(entry.nameservers),
            str(entry.rules),
            scope(entry),
            duration(entry.opened) + " ago",
            f"{entry.lease:.1f}s",
            str(entry.hosts),
        )
        for entry in entries
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n"
        for row in rows
    )


def as_json(entries: tuple[SessionEntry, ...]) -> str:
    """The sessions as a JSON list of objects, the fields named as in SessionEntry."""
    return json.dumps([entry._asdict() for entry in entries], indent=2) + "\n"


def sessions_command(path: str, want_json: bool, out: IO[str], err: IO[str]) -> int:
    """`ctl sessions`: print the sessions; the exit status (1, with one line on err, if
    firewalld cannot be asked)."""
    try:
        entries = list_sessions(path)
    except CtlError as exc:
        print(f"shuttle-firewalld: {exc}", file=err)
        return 1
    out.write(as_json(entries) if want_json else table(entries))
    return 0

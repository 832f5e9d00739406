"""A big OpenSession or UpdateSession checked and turned into rule text by a child process,
so that its seconds of Python never hold the daemon's GIL: the worker thread only waits for
the child, and the loop answers heartbeats and ZAP meanwhile.

The child is `python -I -m shuttle_firewalld.offload METHOD UID`, never a shell: its input is
the request frame alone (a memfd on its stdin), its output one msgpack value on its stdout
(the request's stand-in, and its subnets and excludes as prepared.Prepared), at most
MAX_OUTPUT bytes within BUDGET seconds, or it is killed and the request refused; however it
ends, nothing has changed yet, for the parent applies the rules itself, as for any request.

It parses the member's bytes as that member: it starts as root, imports what it needs,
lowers its limits (memory, CPU, files) and its priority, takes the caller's uid (with group
nogroup and no supplementary groups) and makes itself undumpable, so that this uid cannot
ptrace it, all before it reads a byte. What it sends back is checked again in the parent like
a member's input: the stand-in decodes through the protocol, every field's type and size is
checked, and the rule text may hold only the characters an element or a match is made of,
so a child subverted by the bytes it parsed can shape the rules of that member's own
session, as the member could by asking, and nothing else.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import resource
import select
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
from shuttle_protocol.errors import RemoteProtocolError
from shuttle_protocol.firewall_messages import (
    MAX_SUBNETS,
    OpenSessionRequest,
    UpdateSessionRequest,
)
from shuttle_protocol.frames import MAX_FRAME, decode_frame, encode_frame
from shuttle_protocol.schema import Message

from .errors import RequestError
from .methods.tools import TIMEOUT
from .prepared import (
    Prepared,
    element_lines,
    pack,
    record_size,
    target_match,
)
from .targets import Box, Target, disjoint

METHODS = ("nft", "nat", "tproxy")
CHILD = (sys.executable, "-I", "-m", __name__)  # and METHOD UID: no other input on argv
BUDGET = TIMEOUT  # seconds for the child's whole run: 100,000 targets take about 8 s
# Bytes: the largest request measured here needed 2.3 MB (100,000 IPv6 targets would need
# about 12 MB); the parent holds up to three copies of it while the rules are applied.
MAX_OUTPUT = 16 * 1024 * 1024
NICE = 5  # the child's: a member's big request yields the CPU to the loop (10 starved it here)
CHILD_MEMORY = 1024 * 1024 * 1024  # its address space: it peaked at 250 MiB of RSS
NOBODY_GROUP = 65534  # the child's group (nogroup): none of the caller's groups
READ = 1024 * 1024
PR_SET_DUMPABLE = 4  # <linux/prctl.h>
WATCH = 0.1  # seconds between looks at how the child runs (_meddled)
STOPPED = frozenset("Tt")  # stopped by a signal, or by a tracer
# What the child's text may hold: nft's elements are addresses, prefixes, ranges and port
# ranges, and without a brace nothing can end the elements block they sit in; nat's matches
# are exactly what target_match writes, one a line.
ELEMENT_CHARACTERS = "0123456789abcdef.:/-, \t\n"
NAT_MATCH = re.compile(r"-d [0-9a-f.:/]+( -p tcp)?( -m tcp --dport [0-9]+(:[0-9]+)?)?")


@dataclasses.dataclass(frozen=True)
class Ready:
    """What the child made of a request: a stand-in frame (the request with its first
    subnet and no exclude) and the real subnets and excludes, prepared."""

    stand_in: bytes
    subnets: Prepared
    excludes: Prepared

    def request(self, kind: type[Message]) -> tuple[int, Message]:
        """The stand-in's request id and request, which must be of this kind; RequestError
        if it is not, or not even a request."""
        try:
            request_id, request = decode_frame(self.stand_in)
        except RemoteProtocolError as exc:
            raise RequestError(f"the request's check said something else: {exc}") from None
        if type(request) is not kind:
            raise RequestError(f"the request's check said something else: {type(request)}")
        return request_id, request


def prepare(payload: bytes, method: str, uid: int) -> Ready:
    """Have a child check an OpenSession or UpdateSession frame of uid's and prepare its
    targets for method; RequestError if the request is refused, or the child fails,
    overruns, or says what it may not."""
    if method not in METHODS:
        raise ValueError(f"no such method {method!r}")
    argv = [*CHILD, method, str(uid)]
    try:
        memory = os.memfd_create("shuttle-request")
    except OSError as exc:  # out of descriptors, say
        raise RequestError(f"cannot start the request's check: {exc}") from None
    try:
        reader, writer = os.pipe()
    except OSError as exc:
        os.close(memory)
        raise RequestError(f"cannot start the request's check: {exc}") from None
    try:
        os.write(memory, payload)
        os.lseek(memory, 0, os.SEEK_SET)
        child = subprocess.Popen(
            argv, stdin=memory, stdout=writer, stderr=subprocess.DEVNULL, close_fds=True
        )
    except OSError as exc:
        os.close(reader)
        raise RequestError(f"cannot start the request's check: {exc}") from None
    finally:
        os.close(memory)
        os.close(writer)
    deadline = time.monotonic() + BUDGET
    try:
        output = _read(reader, deadline, child.pid)
        child.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise RequestError(f"the request's check took longer than {BUDGET:g} s") from None
    finally:
        os.close(reader)
        if child.returncode is None:  # it overran
            child.kill()
            child.wait()
    if child.returncode != 0:
        raise RequestError(f"the request's check failed (exit {child.returncode})")
    return _outcome(output, method)


def _read(fd: int, deadline: float, pid: int) -> bytes:
    """The child's whole output; RequestError past the deadline or MAX_OUTPUT bytes, or as
    soon as its caller slows it down (_meddled)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RequestError(f"the request's check took longer than {BUDGET:g} s")
        if not select.select([fd], [], [], min(left, WATCH))[0]:
            meddled = _meddled(pid)
            if meddled is not None:
                raise RequestError(f"the request's check was {meddled} by its caller")
            continue
        chunk = os.read(fd, READ)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_OUTPUT:
            raise RequestError(f"the request's rules would be longer than {MAX_OUTPUT} bytes")
        chunks.append(chunk)


def _meddled(pid: int) -> str | None:
    """What the caller did to its child, which runs as the caller and so may be stopped,
    reniced or rescheduled by it: each would hold the worker, and every other member's
    request behind it, until BUDGET ran out. None: nothing, or the child is gone (its end
    is read next)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the name: state is field 3 of proc(5), nice 19, policy 41.
    state, nice, policy = fields[0], int(fields[16]), int(fields[38])
    if state in STOPPED:
        return "stopped"
    # Lower than NICE: the child's start, before _confine; a caller cannot go that way.
    if nice > NICE or policy != os.SCHED_OTHER:
        return "slowed down"
    return None


def _outcome(output: bytes, method: str) -> Ready:
    """The child's output, checked as input from a member; RequestError if it refuses the
    request, or is not such output."""
    try:
        value = msgpack.unpackb(output, use_list=False, raw=False, strict_map_key=False)
        kind = value[0]
        if kind == "refused" and len(value) == 2 and type(value[1]) is str:
            refusal = value[1]
        elif kind == "ready" and len(value) == 4 and type(value[1]) is bytes:
            return Ready(value[1], prepared_of(value[2], method), prepared_of(value[3], method))
        else:
            refusal = "the request's check said something else"
    except (ValueError, TypeError, IndexError, KeyError, msgpack.UnpackException) as exc:
        refusal = f"the request's check said something else: {exc}"
    raise RequestError(refusal)


def prepared_of(value: Any, method: str) -> Prepared:
    """The Prepared the child's wire_of describes; ValueError or TypeError if it is not that."""
    count, versions, elements, matches, boxes = value
    if type(count) is not int or not 0 <= count <= MAX_SUBNETS:
        raise ValueError("a count out of range")
    if type(versions) is not tuple or not set(versions) <= {4, 6}:
        raise ValueError("no IP versions")
    found = frozenset(versions)
    for part, kind in ((elements, str), (matches, str), (boxes, bytes)):
        if type(part) is not dict or not set(part) <= found:
            raise ValueError("text of another IP version")
        if any(type(item) is not kind for item in part.values()):
            raise ValueError("text that is not text")
    if any(_text_problem(text) for text in elements.values()):
        raise ValueError("nft elements with other characters")
    lines = (line for text in matches.values() for line in text.split("\n"))
    if any(NAT_MATCH.fullmatch(line) is None for line in lines):
        raise ValueError("a nat match of another form")
    if any(len(data) % record_size(version) for version, data in boxes.items()):
        raise ValueError("boxes cut short")
    return Prepared(method, count, found, elements, matches, boxes)


def _text_problem(text: str) -> bool:
    """Whether text holds a character that no element has, looked at in slices: one look at
    megabytes would hold the GIL all along."""
    return any(text[at : at + READ].strip(ELEMENT_CHARACTERS) for at in range(0, len(text), READ))


# The child's side.


def main(argv: list[str]) -> int:
    """The child: argv is METHOD UID; the frame on stdin, the outcome on stdout."""
    if len(argv) != 2 or argv[0] not in METHODS or not argv[1].isdigit():
        print("usage: python -m shuttle_firewalld.offload METHOD UID", file=sys.stderr)
        return 2
    method, uid = argv[0], int(argv[1])
    _confine(uid)
    payload = sys.stdin.buffer.read(MAX_FRAME + 1)
    sys.stdout.buffer.write(msgpack.packb(_work(payload, method), use_bin_type=True))
    sys.stdout.buffer.flush()
    return 0


def _confine(uid: int) -> None:
    """The limits, then the caller's uid (root's request stays root's)."""
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))
    resource.setrlimit(resource.RLIMIT_CPU, (int(BUDGET), int(BUDGET)))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (8, 8))
    os.nice(NICE)
    if uid != 0:
        os.setgroups([])
        os.setresgid(NOBODY_GROUP, NOBODY_GROUP, NOBODY_GROUP)
        os.setresuid(uid, uid, uid)
        # Undumpable, whatever fs.suid_dumpable says: that uid may not ptrace it.
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")


def _work(payload: bytes, method: str) -> tuple[Any, ...]:
    if len(payload) > MAX_FRAME:
        return ("refused", f"bad request: a request is at most {MAX_FRAME} bytes")
    try:
        request_id, request = decode_frame(payload)
    except RemoteProtocolError as exc:
        return ("refused", f"bad request: {exc}")
    if not isinstance(request, (OpenSessionRequest, UpdateSessionRequest)):
        return ("refused", f"{type(request).__name__} is not prepared here")
    subnets = tuple(map(Target.from_wire, request.subnets))
    excludes = tuple(map(Target.from_wire, request.excludes))
    try:
        prepared = (wire_of(subnets, method, True), wire_of(excludes, method, False))
    except RequestError as exc:
        return ("refused", str(exc))
    stand_in: Message = dataclasses.replace(request, subnets=request.subnets[:1], excludes=())
    return ("ready", encode_frame(request_id, stand_in), *prepared)


def wire_of(targets: tuple[Target, ...], method: str, protocol: bool) -> tuple[Any, ...]:
    """Prepared's fields for the targets, as the parent reads them (prepared_of); protocol:
    target_match's, for nat."""
    versions = sorted({target.version for target in targets})
    elements: Mapping[int, str] = {}
    matches: Mapping[int, str] = {}
    found: Mapping[int, list[Box]]
    if method == "nat":
        matches = {
            version: "\n".join(
                target_match(target, protocol) for target in targets if target.version == version
            )
            for version in versions
        }
        # Only shortcuts ask what a nat session covers: targets that overlap too much for
        # disjoint do not refuse the session, only its shortcuts (sessions.shortcut_problem).
        try:
            found = {version: disjoint(targets, version) for version in versions}
        except RequestError:
            found = {}
    else:
        found = {version: disjoint(targets, version) for version in versions}
        elements = {version: element_lines(found[version]) for version in versions}
    # What a session covers, for tproxy's reply sockets and nat's and nft's shortcuts.
    boxes = {version: pack(boxes_of, version) for version, boxes_of in found.items()}
    return (len(targets), versions, elements, matches, boxes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

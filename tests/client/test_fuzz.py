"""Fuzzing the client's Tunnel and Streams with a hostile agent.

A stand-in for ssh runs HOSTILE in place of the server's python: it greets with a valid
Hello, waits for the client's Open of a channel, sends hypothesis-chosen bytes (wrong-state
messages, Data beyond the window, Credit overflow, Eof twice, an escape sequence in an Error,
malformed msgpack...), then closes its end. Whatever it sent, the session ends with one clear
line, no traceback is logged and the event loop's exception handler is never called; the
local program sees its connection end; and the reason agrees with a model of the protocol
(a Mux of the client's, fed the same bytes, and the Tunnel's rules for what may come
after Hello). With Streams, the lost stream is brought back, and the well-behaved agent of
the next attempt serves a channel. (test_tunnel.py has the fixed cases, such as a version
mismatch and the terminal-safe text.)
"""

import asyncio
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Coroutine, Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol.strategies import pack
from shuttle_client import streams as streams_module
from shuttle_client.cli import parse_args
from shuttle_client.streams import Streams
from shuttle_client.tunnel import Tunnel
from shuttle_protocol import PROTOCOL_VERSION
from shuttle_protocol import stream_messages as sm
from shuttle_protocol.errors import RemoteProtocolError
from shuttle_protocol.mux import CLIENT, WINDOW, Mux
from shuttle_protocol.schema import Message
from shuttle_protocol.stream import encode

from .agents import echo_server, exchange, open_on_link

WAIT = 20.0  # the longest any step waits; never reached by a working client
GARBAGE_ENV = "SHUTTLE_TEST_GARBAGE"  # the file of bytes the hostile agent sends
ONCE_ENV = "SHUTTLE_TEST_HOSTILE_ONCE"  # if set: hostile only while this file is missing
SERVER_PYTHON = "/usr/bin/python3"

HOSTILE = """\
import os, sys
from shuttle_protocol import PROTOCOL_VERSION
from shuttle_protocol.stream import StreamDecoder, encode
from shuttle_protocol.stream_messages import Hello, Open

once = os.environ.get("ONCE_ENV")
if once and os.path.exists(once):  # a later attempt: the real agent, as ssh would run it
    os.execv("SERVER_PYTHON", ["SERVER_PYTHON", *sys.argv[1:]])
if once:
    open(once, "w").close()
stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
stdin.read(int(stdin.readline()))  # the upload: not run
stdout.write(encode(Hello(PROTOCOL_VERSION, ("tcp", "udp"), "hostile")))
stdout.flush()
decoder = StreamDecoder()
while not any(isinstance(msg, Open) for msg in decoder.feed(os.read(0, 65536) or b"\\xc1")):
    pass
with open(os.environ["GARBAGE_ENV"], "rb") as garbage:
    stdout.write(garbage.read())
stdout.flush()
os.close(1)  # stdout.close() would not: Python's standard streams never close their fds
while os.read(0, 65536):  # until the client goes
    pass
""".replace("ONCE_ENV", ONCE_ENV).replace("GARBAGE_ENV", GARBAGE_ENV)
HOSTILE = HOSTILE.replace("SERVER_PYTHON", SERVER_PYTHON)


# -- what the hostile agent sends ---------------------------------------------------------------

OURS = 1  # the channel the client opened
NEVER = 2  # one it never opened

MESSAGES: List[Message] = [
    sm.Hello(PROTOCOL_VERSION, ("tcp",), "again"),
    sm.Welcome(PROTOCOL_VERSION, ()),
    sm.Open(OURS, "127.0.0.1", 80),
    sm.UdpOpen(7, "127.0.0.1", 53),
    sm.GetRoutes(),
    sm.GetNameservers(),
    sm.GetHosts(()),
    sm.Routes(("10.0.0.0/8",), False),
    sm.Nameservers(("10.0.0.53",)),
    sm.Hosts((("db1", "10.0.0.7"),)),
    sm.Ping(1),
    sm.Pong(12345),
    sm.Opened(OURS),
    sm.Refused(OURS, 111, "refused \x1b[2J"),
    sm.Data(OURS, b"x" * 10),
    sm.Data(OURS, b""),
    sm.Data(NEVER, b"x"),
    sm.Credit(OURS, 1),
    sm.Credit(OURS, sm.MAX_CREDIT),
    sm.Eof(OURS),
    sm.Close(OURS, "bye"),
    sm.Close(NEVER, "bye"),
    sm.Datagram(OURS, b"u"),
    sm.Error("the agent says \x1b[2J\x07 goodbye"),
]


@st.composite
def garbage(draw: Any) -> Tuple[bytes, ...]:
    """The pieces of what the hostile agent sends after Hello: messages, and bytes no agent
    may send. A piece over 4 KiB is one whole message."""
    pieces: List[bytes] = []
    for kind in draw(st.lists(st.integers(0, 10), min_size=1, max_size=8)):
        if kind == 10:  # what an agent sends last: why it gives up
            pieces.append(encode(MESSAGES[-1]))
        elif kind <= 4:
            pieces.append(encode(draw(st.sampled_from(MESSAGES))))
        elif kind == 5:  # more than the window on our channel
            pieces += [encode(sm.Data(OURS, b"w" * sm.MAX_DATA))] * (WINDOW // sm.MAX_DATA)
            pieces.append(encode(sm.Data(OURS, b"!")))
        elif kind == 6:
            pieces.append(draw(st.binary(min_size=1, max_size=100)))
        elif kind == 7:  # any tag, fields of any kind
            values = st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=8))
            pieces.append(pack([draw(st.integers(0, 70)), *draw(st.lists(values, max_size=5))]))
        elif kind == 8:  # a message cut short: the agent closes in the middle of it
            pieces.append(encode(draw(st.sampled_from(MESSAGES)))[:-1])
        else:
            pieces.append(draw(st.sampled_from([b"\x91" * 3000, pack([sm.Data.TAG, OURS, 2**20])])))
    return tuple(pieces)


# -- what the client should make of it -----------------------------------------------------------

# After Hello, the Tunnel takes these (the Mux permitting) and fails on any other message.
TAKEN = (sm.Ping, sm.Pong, sm.Opened, sm.Refused, sm.Data, sm.Credit, sm.Eof, sm.Close, sm.Datagram)


def first_event(pieces: Tuple[bytes, ...], delivered: bool) -> Tuple[str, bool]:
    """What comes first by a model, a client Mux with our channel open whose bytes are
    delivered at once or never: "failed", "reported" (an Error) or "closed" (neither); and
    whether a failure follows an Error (in the same read, the client may see that first).

    Small pieces go in a byte at a time, so that messages come out one by one, in order."""
    mux = Mux(CLIENT)
    mux.open("127.0.0.1", 80)
    mux.outgoing()
    reported = False
    for piece in pieces:
        step = 1 if len(piece) <= 4096 else len(piece)
        for start in range(0, len(piece), step):
            try:
                messages = mux.receive(piece[start : start + step])
            except RemoteProtocolError:
                return ("reported", True) if reported else ("failed", True)
            for msg in messages:
                if reported:
                    if not isinstance(msg, TAKEN):
                        return "reported", True
                    continue
                if isinstance(msg, sm.Error):
                    reported = True
                elif not isinstance(msg, TAKEN):
                    return "failed", True
                elif delivered and isinstance(msg, sm.Data) and msg.channel in mux.channels:
                    mux.delivered(msg.channel, len(msg.payload))
                    mux.outgoing()
    return ("reported" if reported else "closed"), False


def allowed_ends(pieces: Tuple[bytes, ...]) -> set:  # type: ignore[type-arg]
    """The ends the client may come to, by both models."""
    ends = set()
    for delivered in (True, False):
        first, failure_follows = first_event(pieces, delivered)
        ends.add(first)
        if first == "reported" and failure_follows:
            ends.add("failed")
    return ends


class Watch(logging.Handler):
    """Every log record, and every call of the loop's exception handler."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []
        self.loop_errors: List[Dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def on_loop_error(self, loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
        self.loop_errors.append(context)

    def check_clean(self) -> None:
        """No traceback anywhere, every line one line."""
        assert self.loop_errors == []
        for record in self.records:
            assert record.exc_info is None, record.getMessage()
            assert "\n" not in record.getMessage() and "Traceback" not in record.getMessage()

    def lines(self, level: int) -> List[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def watch() -> Iterator[Watch]:
    handler = Watch()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


@pytest.fixture
def hostile(
    tmp_path: Path, fake_ssh: str, monkeypatch: pytest.MonkeyPatch
) -> Tuple[str, str, Path]:
    """(the stand-in ssh, the hostile agent's path for --python, its garbage file)."""
    agent = tmp_path / "hostile-agent"
    agent.write_text(f"#!{sys.executable}\n{HOSTILE}")
    agent.chmod(0o755)
    garbage_file = tmp_path / "garbage"
    monkeypatch.setenv(GARBAGE_ENV, str(garbage_file))
    monkeypatch.delenv(ONCE_ENV, raising=False)
    return fake_ssh, str(agent), garbage_file


def options(ssh: str, python: str) -> Any:
    return parse_args(["-r", "server", "-e", ssh, "--python", python, "10.0.0.0/8"])


async def ends(program: socket.socket) -> bool:
    """Whether the program's end of the channel ends (EOF or reset) in time; what the agent
    sent on it before is read and dropped."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(program, 1 << 20), WAIT)
        except ConnectionResetError:
            return True
        except asyncio.TimeoutError:
            return False
        if not chunk:
            return True
    return False


def check_reason(
    reason: str, link_failed: Optional[str], pieces: Tuple[bytes, ...], watch: Watch
) -> str:
    """The session's end agrees with the model; returns the kind of end."""
    assert "\n" not in reason and "\x1b" not in reason and "Traceback" not in reason, reason
    models = allowed_ends(pieces)
    if link_failed is not None:
        assert "failed" in models or "reported" in models, (reason, models)
        assert reason in watch.lines(logging.ERROR)  # Link.fail logged it, once, as it is
        return "failed"
    if reason.startswith("the agent reported: "):
        assert "reported" in models, (reason, models)
        return "reported"
    assert reason == "agent closed the connection", reason
    assert "closed" in models, (reason, models)
    return "closed"


Scenario = Callable[[Tuple[bytes, ...]], Coroutine[Any, Any, None]]


def attack(
    scenario: Scenario, garbage_file: Path, watch: Watch, examples: int, seconds: float
) -> None:
    """Run scenario for hypothesis's garbage (the hostile agent sends it), within a wall-clock
    bound: the examples after it do nothing."""
    deadline = time.monotonic() + seconds

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(pieces=garbage())
    def one(pieces: Tuple[bytes, ...]) -> None:
        if time.monotonic() > deadline:
            return
        garbage_file.write_bytes(b"".join(pieces))
        watch.records.clear()
        asyncio.run(asyncio.wait_for(scenario(pieces), 3 * WAIT))
        watch.check_clean()

    one()


@pytest.mark.parametrize(
    ("examples", "seconds"),
    [(60, 10.0), pytest.param(1000, 600.0, marks=pytest.mark.slow)],
    ids=["quick", "long"],
)
def test_a_hostile_agent_ends_the_session_with_one_clear_line(
    hostile: Tuple[str, str, Path], watch: Watch, examples: int, seconds: float
) -> None:
    ssh, agent, garbage_file = hostile
    kinds: Dict[str, int] = {}

    async def scenario(pieces: Tuple[bytes, ...]) -> None:
        asyncio.get_running_loop().set_exception_handler(watch.on_loop_error)
        server = await echo_server()
        tunnel = Tunnel(options(ssh, agent))
        await tunnel.start()
        try:
            program = await open_on_link(tunnel.link, server.sockets[0].getsockname()[1])
            with program:
                reason = await asyncio.wait_for(tunnel.link.closed, WAIT) or ""
                assert await ends(program)
            kind = check_reason(reason, tunnel.link.failed, pieces, watch)
            kinds[kind] = kinds.get(kind, 0) + 1
        finally:
            await tunnel.stop()
            server.close()
        await asyncio.sleep(0)  # the loop goes on
        assert await tunnel.wait_exit(5) is not None

    attack(scenario, garbage_file, watch, examples, seconds)
    print(f"ends: {kinds}")
    assert kinds


@pytest.mark.parametrize(
    ("examples", "seconds"),
    [(25, 10.0), pytest.param(300, 600.0, marks=pytest.mark.slow)],
    ids=["quick", "long"],
)
def test_a_stream_lost_to_a_hostile_agent_comes_back_and_serves(
    hostile: Tuple[str, str, Path],
    watch: Watch,
    monkeypatch: pytest.MonkeyPatch,
    examples: int,
    seconds: float,
) -> None:
    ssh, agent, garbage_file = hostile
    monkeypatch.setattr(streams_module, "BACKOFF_FIRST", 0.05)  # no need to wait a second
    once = garbage_file.with_name("attacked")
    monkeypatch.setenv(ONCE_ENV, str(once))

    async def scenario(pieces: Tuple[bytes, ...]) -> None:
        once.unlink(missing_ok=True)  # hostile first, then the real agent
        asyncio.get_running_loop().set_exception_handler(watch.on_loop_error)
        server = await echo_server()
        streams = Streams(options(ssh, agent))
        await streams.start()
        try:
            first = streams.tunnels[0]
            port = server.sockets[0].getsockname()[1]
            program = await open_on_link(first.link, port)
            with program:
                reason = await asyncio.wait_for(first.link.closed, WAIT) or ""
                assert await ends(program)
            check_reason(reason, first.link.failed, pieces, watch)
            for _ in range(int(WAIT * 20)):
                if streams.reconnects == 1 and streams.up == 1:
                    break
                await asyncio.sleep(0.05)
            assert (streams.reconnects, streams.up) == (1, 1)
            assert f"lost the tunnel (agent): {reason}" in watch.lines(logging.WARNING)
            link = streams.pick()
            assert link is not None and link is not first.link
            assert await exchange(await open_on_link(link, port), b"after") == b"after"
        finally:
            await streams.stop()
            server.close()

    attack(scenario, garbage_file, watch, examples, seconds)


def test_stopping_the_streams_closes_each_link_and_its_channels(fake_ssh: str) -> None:
    """Found by the fuzzer: Streams.stop() cancelled the task that awaited a link's end,
    which cancelled the link's own future; the link then took itself as finished, so its
    channels were never reset and ssh's stdin never closed (the agent ended only on SIGTERM,
    seconds later)."""

    async def scenario() -> None:
        server = await echo_server()
        streams = Streams(options(fake_ssh, SERVER_PYTHON))
        await streams.start()
        link = streams.tunnels[0].link
        program = await open_on_link(link, server.sockets[0].getsockname()[1])
        try:
            with program:
                await streams.stop()
                assert not link.closed.cancelled()
                assert link.closed.result() == "stopping"
                assert link.channels == {}
                assert await ends(program)
        finally:
            server.close()

    asyncio.run(asyncio.wait_for(scenario(), 3 * WAIT))


def test_nothing_after_the_agents_error_is_acted_on(
    hostile: Tuple[str, str, Path], watch: Watch
) -> None:
    """Found by the fuzzer: the messages behind an Error in the same read were still
    dispatched, so a Hello there logged "Hello twice" for a session already over."""
    ssh, agent, garbage_file = hostile
    error = sm.Error("the agent gives up")
    garbage_file.write_bytes(b"".join(map(encode, (error, MESSAGES[0], MESSAGES[1]))))

    async def scenario() -> None:
        tunnel = Tunnel(options(ssh, agent))
        await tunnel.start()
        try:
            program = await open_on_link(tunnel.link, 9)  # the agent never connects it
            with program:
                reason = await asyncio.wait_for(tunnel.link.closed, WAIT)
                assert await ends(program)
            assert reason == "the agent reported: the agent gives up"
            assert tunnel.link.failed is None
        finally:
            await tunnel.stop()

    asyncio.run(asyncio.wait_for(scenario(), 3 * WAIT))
    assert watch.lines(logging.ERROR) == []
    watch.check_clean()

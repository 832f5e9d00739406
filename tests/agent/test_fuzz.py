"""Fuzzing a real agent process with a hostile client's byte stream.

After a valid Hello/Welcome, hypothesis chooses a sequence of messages: valid ones in the
wrong state (Hello, Opened, Routes... sent to the agent), channels never opened or already
gone, Data beyond the credit window, Credit overflow, Eof twice, floods of UdpOpen, the
largest Datagram and one over it, malformed msgpack. Then a probe: a Ping and a new channel
to a local echo server. Either the agent still serves the probe, or it ended the session
with one Error message that names the problem, logged that same line on stderr, and exited
with status 3; never a traceback. Its resident memory stays under MAX_RSS.

The agent runs in a network namespace of the test's own (loopback and a veth pair whose
both ends are inside), with an echo server there: names the fuzzer makes up cannot reach
any resolver outside, nor can any connection. (test_main.py has the fixed cases: garbage,
Open before Welcome, Data on a UDP channel; tests/protocol/test_mux.py the Mux's rules.)
"""

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol.strategies import pack
from shuttle_agent.main import EXIT_PROTOCOL
from shuttle_agent.udp import IDLE_ENV, MAX_FLOWS_ENV
from shuttle_ends.relay import Link
from shuttle_protocol import PROTOCOL_VERSION
from shuttle_protocol import stream_messages as sm
from shuttle_protocol.mux import AGENT, WINDOW, Mux
from shuttle_protocol.schema import Message
from shuttle_protocol.stream import MAX_MESSAGE, StreamDecoder, encode

from .agent_process import OLDEST_PYTHON, SERVER_PYTHON, AgentProcess, Namespace, stop

pytestmark = pytest.mark.integration

# A Python process relaying a few channels holds about 20 MiB; each channel may buffer one
# window (1 MiB) each way, and a sequence opens a few dozen at most.
MAX_RSS = 120 * 1024 * 1024
MAX_FLOWS = 8  # the agent's UDP flow cap for the run, so that floods reach it
WAIT = 20.0  # the longest any step waits for the agent; never reached by a working one
# How long the probe waits for its answers. Shorter than WAIT, because an agent in the middle
# of a message cut short answers nothing; no timing assertion: an agent too slow for it is
# taken as not serving, and must then end properly when the rest of that message comes.
PROBE_WAIT = 3.0

ECHO = """\
import socket, sys, threading
tcp = socket.socket()
tcp.bind(("127.0.0.1", 0))
tcp.listen(128)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.1", 0))
closed = socket.socket()
closed.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
print(tcp.getsockname()[1], udp.getsockname()[1], closed.getsockname()[1], flush=True)
def echo(conn):
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:  # the agent reset the channel
            pass
def accept():
    while True:
        threading.Thread(target=echo, args=(tcp.accept()[0],), daemon=True).start()
def echo_udp():
    while True:
        data, peer = udp.recvfrom(65536)
        udp.sendto(data, peer)
threading.Thread(target=accept, daemon=True).start()
threading.Thread(target=echo_udp, daemon=True).start()
sys.stdin.read()  # EOF: the test is done
"""


class Echo:
    """TCP and UDP echo servers on 127.0.0.1 inside the namespace, and a refusing port."""

    def __init__(self, namespace: Namespace) -> None:
        self.proc = subprocess.Popen(
            [*namespace.wrapper, sys.executable, "-c", ECHO],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ports = self.proc.stdout.readline().split()
        if len(ports) != 3:
            self.close()
            raise AssertionError("the echo server did not start")
        self.tcp, self.udp, self.closed = map(int, ports)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def echo(netns: Namespace) -> Iterator[Echo]:
    # Made-up names go to a resolver that is not there, on the namespace's loopback.
    netns.write_etc("resolv.conf", "nameserver 127.0.0.1\n")
    netns.write_etc("hosts", "127.0.0.1 localhost\n")
    server = Echo(netns)
    try:
        yield server
    finally:
        server.close()


class Session:
    """One agent process driven as a hostile client; a thread decodes all it sends."""

    def __init__(self, namespace: Namespace, python: str) -> None:
        env = {IDLE_ENV: "30", MAX_FLOWS_ENV: str(MAX_FLOWS)}
        self.agent = AgentProcess(python, env, namespace.wrapper)
        self.received: List[Message] = []
        self.ended = threading.Event()  # the agent closed its stdout
        self.decode_error: Optional[str] = None
        self.changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.agent.process.pid

    def _read(self) -> None:
        stdout = self.agent.process.stdout
        assert stdout is not None
        while True:
            data = os.read(stdout.fileno(), 1 << 20)
            with self.changed:
                if not data:
                    self.ended.set()
                else:
                    try:
                        self.received.extend(self.agent.decoder.feed(data))
                    except Exception as exc:  # the agent sent what no client could read
                        self.decode_error = f"{type(exc).__name__}: {exc}"
                        self.ended.set()
                self.changed.notify_all()
            if self.ended.is_set():
                return

    def send(self, data: bytes) -> bool:
        """Write to the agent; False once it has stopped reading (the session is over)."""
        try:
            self.agent.send_raw(data)
        except (BrokenPipeError, ValueError):  # ValueError: our end is closed already
            return False
        return True

    def wait_for(self, found: Callable[[List[Message]], bool], timeout: float = WAIT) -> bool:
        """Until found(received) or the agent's end; whether it was found."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not found(self.received):
                left = deadline - time.monotonic()
                if self.ended.is_set() or left <= 0:
                    return found(self.received)
                self.changed.wait(left)
        return True

    def finish(self) -> Tuple[int, str]:
        """(exit status, stderr), once the agent has ended."""
        process = self.agent.process
        assert process.stdin is not None and process.stderr is not None
        try:
            process.stdin.close()
        except BrokenPipeError:  # what we wrote last was never read: the agent stopped
            pass
        status = process.wait(WAIT)
        return status, process.stderr.read().decode()

    def errors(self) -> List[sm.Error]:
        return [msg for msg in self.received if isinstance(msg, sm.Error)]

    def stop(self) -> None:
        self.agent.process.kill()
        self.agent.process.wait(WAIT)
        self._reader.join(WAIT)  # it reads the end first: its fd is closed only after
        stop(self.agent)


def rss(pid: int) -> int:
    """Resident set size in bytes, from /proc; 0 for a process that is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0  # a zombie has no memory left


# -- what the hostile client sends ------------------------------------------------------------


class Plan:
    """Channel ids for a sequence: the ones opened so far and the next new one."""

    def __init__(self) -> None:
        self.opened: List[int] = []
        self.next = 1

    def new(self) -> int:
        channel = self.next
        self.next += 1
        self.opened.append(channel)
        return channel

    def some(self, data: st.DataObject) -> int:
        """A channel opened before (maybe gone by now), one never opened, or 1."""
        index = data.draw(st.integers(0, 15))
        if index == 15:
            return self.next + data.draw(st.sampled_from([0, 1, 10**12]))
        return self.opened[index % len(self.opened)] if self.opened else 1


Step = Callable[[st.DataObject, Plan, Echo], bytes]


def _open_echo(data: st.DataObject, plan: Plan, echo: Echo) -> bytes:
    return encode(sm.Open(plan.new(), "127.0.0.1", echo.tcp))


def _open_elsewhere(data: st.DataObject, plan: Plan, echo: Echo) -> bytes:
    host = data.draw(st.sampled_from(["127.0.0.1", "::1", "", "nowhere.invalid", "a" * 64]))
    port = data.draw(st.sampled_from([echo.closed, 1, 65535]))
    return encode(sm.Open(plan.new(), host, port))


def _open_again(data: st.DataObject, plan: Plan, echo: Echo) -> bytes:
    channel = plan.opened[-1] if plan.opened else 1
    return encode(sm.Open(channel, "127.0.0.1", echo.tcp))


def _data(data: st.DataObject, plan: Plan, echo: Echo) -> bytes:
    size = data.draw(st.sampled_from([0, 1, 1000, sm.MAX_DATA]))
    return encode(sm.Data(plan.some(data), b"d" * size))


def _beyond_credit(data: st.DataObject, plan: Plan, echo: Echo) -> bytes:
    channel = plan.some(data)
    pieces = [sm.Data(channel, b"w" * sm.MAX_DATA)] * (WINDOW // sm.MAX_DATA) + [
        sm.Data(channel, b"!")
    ]
    return b"".join(map(encode, pieces))


def _credit(data: st.DataObject, plan: Plan, echo: Echo) -> bytes:
    n = data.draw(st.sampled_from([1, 4096, sm.MAX_CREDIT]))
    return encode(sm.Credit(plan.some(data), n)) * data.draw(st.integers(1, 2))


def _eof(data: st.DataObject, plan: Plan, echo: Echo) -> bytes:
    return encode(sm.Eof(plan.some(data))) * data.draw(st.integers(1, 2))


def _close(data: st.DataObject, plan: Plan, echo: Echo) -> bytes:
    return encode(sm.Close(plan.some(data), "fuzz"))


def _udp_flood(data: st.DataObject, plan: Plan, echo: Echo) -> bytes:
    count = data.draw(st.sampled_from([1, MAX_FLOWS, 4 * MAX_FLOWS]))
    host = data.draw(st.sampled_from(["127.0.0.1", "::1", "nowhere.invalid"]))
    return b"".join(encode(sm.UdpOpen(plan.new(), host, echo.udp)) for _ in range(count))


def _datagram(data: st.DataObject, plan: Plan, echo: Echo) -> bytes:
    size = data.draw(st.sampled_from([0, 10, sm.MAX_DATAGRAM]))
    return encode(sm.Datagram(plan.some(data), b"u" * size))


def _datagram_too_big(data: st.DataObject, plan: Plan, echo: Echo) -> bytes:
    return pack([sm.Datagram.TAG, plan.some(data), b"u" * (sm.MAX_DATAGRAM + 1)])


WRONG: List[Message] = [
    sm.Hello(PROTOCOL_VERSION, ("tcp",), "3.11.2"),
    sm.Welcome(PROTOCOL_VERSION, ("tcp",)),
    sm.Welcome(PROTOCOL_VERSION + 1, ()),
    sm.Routes(("10.0.0.0/8",), False),
    sm.Nameservers(("10.0.0.53",)),
    sm.Hosts((("db1", "10.0.0.7"),)),
    sm.Pong(7),
    sm.GetRoutes(),
    sm.GetNameservers(),
    sm.Ping(2**63 - 1),
    sm.Error("the client gives up"),
]


def _wrong_state(data: st.DataObject, plan: Plan, echo: Echo) -> bytes:
    kind = data.draw(st.integers(0, len(WRONG) + 1))
    if kind == len(WRONG):
        return encode(sm.Opened(plan.some(data)))
    if kind == len(WRONG) + 1:
        return encode(sm.Refused(plan.some(data), 111, "no"))
    return encode(WRONG[kind])


def _malformed(data: st.DataObject, plan: Plan, echo: Echo) -> bytes:
    kind = data.draw(st.integers(0, 3))
    if kind == 0:
        return data.draw(st.binary(min_size=1, max_size=200))
    if kind == 1:  # a known tag with fields of any kind
        tag = data.draw(st.integers(0, 70))
        values = st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=8))
        fields = data.draw(st.lists(values, max_size=6))
        return pack([tag, *fields])
    if kind == 2:  # a Data header that promises more than the largest message
        return pack([sm.Data.TAG, plan.some(data), sm.MAX_DATA + 1])
    return b"\x91" * data.draw(st.sampled_from([100, 5000]))  # nesting


STEPS: Dict[str, Step] = {
    "open_echo": _open_echo,
    "open_elsewhere": _open_elsewhere,
    "open_again": _open_again,
    "data": _data,
    "beyond_credit": _beyond_credit,
    "credit": _credit,
    "eof": _eof,
    "close": _close,
    "udp_flood": _udp_flood,
    "datagram": _datagram,
    "datagram_too_big": _datagram_too_big,
    "wrong_state": _wrong_state,
    "malformed": _malformed,
}
# Opening and using channels are likelier than the rest, so that later steps find channels
# to abuse, and not every sequence ends at its first step.
STEP_NAMES = ["open_echo", "open_echo", "data", "credit", "eof", "close", "datagram", *STEPS]


# -- the oracle ---------------------------------------------------------------------------------


def probe(session: Session, plan: Plan, echo: Echo) -> bool:
    """Whether the agent still serves: a Pong, then a new channel's echo."""
    if not session.send(encode(sm.Ping(424242))):
        return False
    if not session.wait_for(lambda got: sm.Pong(424242) in got, PROBE_WAIT):
        return False
    channel = plan.next
    sent = session.send(
        encode(sm.Open(channel, "127.0.0.1", echo.tcp)) + encode(sm.Data(channel, b"hi"))
    )
    return sent and session.wait_for(
        lambda got: sm.Opened(channel) in got and sm.Data(channel, b"hi") in got, PROBE_WAIT
    )


def check_ended(session: Session, steps: List[str], client_error: bool) -> None:
    """The agent ended the session as it should: one Error naming the problem, the same line
    on stderr, status 3; or, after the client's own Error, status 3 and nothing to say."""
    assert session.wait_for(lambda got: False) is False  # until its end
    assert session.ended.is_set(), f"the agent neither serves nor ends, after {steps}"
    status, stderr = session.finish()
    assert "Traceback" not in stderr, stderr
    assert status == EXIT_PROTOCOL, (status, stderr)
    errors = session.errors()
    if not errors:
        assert client_error, f"ended without an Error, after {steps}: {stderr}"
        return
    assert len(errors) == 1 and session.received[-1] == errors[0], session.received[-3:]
    text = errors[0].text
    assert text and "\n" not in text
    assert f"shuttle-agent: {text}\n" in stderr, (text, stderr)


def draw_sequence(data: st.DataObject, echo: Echo) -> Tuple[List[str], List[bytes], Plan]:
    """The steps' names, their bytes, and the channels they used: a channel to the echo
    server first, for the steps to abuse."""
    plan = Plan()
    steps = ["open_echo", *data.draw(st.lists(st.sampled_from(STEP_NAMES), max_size=10))]
    return steps, [STEPS[name](data, plan, echo) for name in steps], plan


def run_sequence(
    namespace: Namespace, python: str, echo: Echo, sequence: Tuple[List[str], List[bytes], Plan]
) -> Tuple[str, int]:
    """One agent, one hostile sequence, the probe and the oracle: ("served" or the Error's
    text, peak RSS)."""
    steps, chunks, plan = sequence
    session = Session(namespace, python)
    try:
        assert session.wait_for(bool) and isinstance(session.received[0], sm.Hello)
        session.send(encode(sm.Welcome(PROTOCOL_VERSION, ("tcp", "udp"))))
        client_error = False
        for chunk in chunks:
            client_error = client_error or chunk.endswith(encode(WRONG[-1]))
            if not session.send(chunk):
                break
        peak = rss(session.pid)
        served = probe(session, plan, echo)
        if not served and not session.ended.is_set():
            # A message cut short waits for the rest, which may be long: this ends any, as
            # a byte msgpack never uses or more than the longest message.
            session.send(b"\xc1" * (MAX_MESSAGE + 1024))
        peak = max(peak, rss(session.pid))
        assert session.decode_error is None, session.decode_error
        if served:
            assert session.errors() == [], session.errors()
            return "served", peak
        check_ended(session, steps, client_error)
        errors = session.errors()
        return errors[0].text if errors else "the client's Error", peak
    finally:
        session.stop()


@pytest.mark.parametrize(
    ("python", "examples", "seconds"),
    [
        (SERVER_PYTHON, 80, 12.0),
        # The oldest Python has no msgpack: the agent decodes with the pure-Python fallback.
        (OLDEST_PYTHON, 40, 8.0),
        pytest.param(SERVER_PYTHON, 1000, 600.0, marks=pytest.mark.slow),
        pytest.param(OLDEST_PYTHON, 1000, 600.0, marks=pytest.mark.slow),
    ],
    ids=["quick", "quick-oldest", "long", "long-oldest"],
)
def test_a_hostile_client_is_served_or_told_why_never_a_traceback(
    netns: Namespace, echo: Echo, python: str, examples: int, seconds: float
) -> None:
    outcomes: Dict[str, int] = {}
    peaks = [0]
    deadline = time.monotonic() + seconds

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def sequence(data: st.DataObject) -> None:
        drawn = draw_sequence(data, echo)
        if time.monotonic() > deadline:
            return  # the wall-clock bound: drawn as the others, not run
        outcome, peak = run_sequence(netns, python, echo, drawn)
        kind = re.sub(r"[0-9]+", "N", outcome)[:60]  # the kinds of outcome, for the summary
        outcomes[kind] = outcomes.get(kind, 0) + 1
        peaks[0] = max(peaks[0], peak)

    sequence()
    print(f"outcomes: {sorted(outcomes.items(), key=lambda item: -item[1])}; peak {peaks[0]}")
    assert outcomes
    assert peaks[0] < MAX_RSS


def test_nothing_after_the_clients_error_is_acted_on(agent: AgentProcess) -> None:
    """Found by the fuzzer: the messages behind an Error in the same read were still
    dispatched, so an Open there made a connection after the session had ended."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0)
        port = listener.getsockname()[1]
        hello = agent.receive()
        assert isinstance(hello, sm.Hello)
        # One write, well under PIPE_BUF: the agent reads it all at once.
        agent.send_raw(
            encode(sm.Welcome(PROTOCOL_VERSION, ("tcp",)))
            + encode(sm.Error("the client gives up"))
            + encode(sm.Open(1, "127.0.0.1", port))
            + encode(sm.Ping(5))
        )
        status, stderr = agent.finish()
        assert status == EXIT_PROTOCOL
        assert "Traceback" not in stderr
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            return  # nobody connected
        connection.close()
        pytest.fail("the agent connected after the session had ended")


class Writer:
    """A pipe's write end as the Link uses it, keeping what is written."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_the_error_is_the_last_message_even_with_credit_to_grant() -> None:
    """Found by the fuzzer: a failure with credit still to grant sent the Error first and
    the Credit after it, though nothing may follow an Error."""

    async def scenario() -> None:
        link = Link(Mux(AGENT), lambda msg: None, "client")
        writer = Writer()
        link.attach_writer(writer)  # type: ignore[arg-type]
        link.data_received(encode(sm.Open(1, "127.0.0.1", 9)) + encode(sm.Data(1, b"x" * 10)))
        link.mux.delivered(1, 10)  # the socket took it: a Credit is due
        link.fail("boom")
        assert StreamDecoder().feed(writer.written) == [sm.Credit(1, 10), sm.Error("boom")]
        assert writer.closed

    asyncio.run(asyncio.wait_for(scenario(), WAIT))

"""The agent as a process, driven over its stdin/stdout the way the client drives it, and the
network namespaces that give it a server of known routes, neighbours and /etc files."""

import os
import secrets
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest
from shuttle_client.upload import STAGE1, build_payload
from shuttle_protocol import PROTOCOL_VERSION
from shuttle_protocol.schema import Message
from shuttle_protocol.stream import StreamDecoder, encode
from shuttle_protocol.stream_messages import Hello, Welcome

SERVER_PYTHON = "/usr/bin/python3"
# The oldest Python the agent supports, without msgpack: the pure-Python fallback is used.
OLDEST_PYTHON = "/root/.pyenv/versions/3.8.18/bin/python3"
# Without the oldest, the tests on it fail (require_python): the promise is not left untested.
PYTHONS = [SERVER_PYTHON, OLDEST_PYTHON]
# Not a timing assertion: only how long a broken agent may hang a test before it fails.
STUCK = 30.0
# `ip netns exec NAME` bind-mounts each file of /etc/netns/NAME over the same name in /etc.
ETC_NETNS = Path("/etc/netns")


def require_python(python: str) -> None:
    """Fail the test, with how to mend it, if this Python is not installed."""
    if not os.path.exists(python):
        pytest.fail(
            f"{python} is missing, so the agent is not tested on it: install it "
            f"(the oldest Python the agent supports: pyenv install 3.8.18)",
            pytrace=False,
        )


class AgentProcess:
    """A real agent booted from the upload payload, with a decoder on its stdout.

    wrapper goes before the python command: ("ip", "netns", "exec", name), say.
    """

    def __init__(
        self,
        python: str = SERVER_PYTHON,
        env: Optional[Dict[str, str]] = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        require_python(python)
        self.process = subprocess.Popen(
            [*wrapper, python, "-c", STAGE1],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self.decoder = StreamDecoder()
        self.pending: List[Message] = []
        self.send_raw(build_payload())

    def send_raw(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def send(self, msg: Message) -> None:
        self.send_raw(encode(msg))

    def receive(self) -> Message:
        """The next message; fails the test if the agent closes its stdout first."""
        assert self.process.stdout is not None
        for _ in range(10_000):
            if self.pending:
                return self.pending.pop(0)
            # read1(65536) empties the reader's buffer each time, so the fd tells the truth.
            if not select.select([self.process.stdout], [], [], STUCK)[0]:
                pytest.fail("the agent sent nothing for a long time")
            data = self.process.stdout.read1(65536)
            if not data:
                pytest.fail("the agent closed its stdout: " + self.finish()[1])
            self.pending.extend(self.decoder.feed(data))
        pytest.fail("no message from the agent")

    def finish(self) -> "tuple[int, str]":
        """Close stdin; (exit status, stderr)."""
        assert self.process.stdin is not None and self.process.stderr is not None
        self.process.stdin.close()
        status = self.process.wait(timeout=10)
        return status, self.process.stderr.read().decode()


StartAgent = Callable[..., AgentProcess]


def stop(process: AgentProcess) -> None:
    process.process.kill()
    process.process.wait()
    for stream in (process.process.stdin, process.process.stdout, process.process.stderr):
        if stream is not None and not stream.closed:
            stream.close()


def welcomed(agent: AgentProcess) -> AgentProcess:
    hello = agent.receive()
    assert isinstance(hello, Hello)
    agent.send(Welcome(PROTOCOL_VERSION, ("tcp",)))
    return agent


class Namespace:
    """A network namespace of a test's own, with its own /etc files; remove() undoes both."""

    def __init__(self) -> None:
        self.name = f"shuttle-agt-{secrets.token_hex(4)}"
        self.etc = ETC_NETNS / self.name
        self.wrapper = ("ip", "netns", "exec", self.name)
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=10)

    def ip(self, *args: str, stdin: Optional[str] = None) -> None:
        subprocess.run(
            ["ip", "-n", self.name, *args], input=stdin, text=True, check=True, timeout=30
        )

    def wait_link_locals(self, links: Sequence[str], timeout: float = STUCK) -> None:
        """Wait until each of links has its IPv6 link-local address, past duplicate address
        detection: the kernel adds it (and its route in the local table) a while after the
        link comes up, so until then two reads of the routes may differ."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 2):
            if set(links) <= self._settled_link_locals() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not set(links) <= self._settled_link_locals():
            raise AssertionError(f"no settled link-local address on {links} in {self.name}")

    def _settled_link_locals(self) -> "set[str]":
        """The links that have a link-local address no longer tentative."""
        out = subprocess.run(
            ["ip", "-n", self.name, "-6", "-o", "addr", "show", "scope", "link"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return {line.split()[1] for line in out.splitlines() if "tentative" not in line}

    def read(self, path: str) -> str:
        """A file as processes in the namespace see it (/proc/net/route, say)."""
        return subprocess.run(
            [*self.wrapper, "cat", path], capture_output=True, text=True, check=True, timeout=10
        ).stdout

    def write_etc(self, name: str, text: str) -> None:
        """/etc/NAME for the processes started in the namespace from now on."""
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / name).write_text(text)

    def remove(self) -> None:
        # /etc/netns itself stays: other namespaces' files may be in it.
        shutil.rmtree(self.etc, ignore_errors=True)
        subprocess.run(["ip", "netns", "del", self.name], check=False, timeout=10)

"""sd_notify: what arrives on a real NOTIFY_SOCKET, and that nothing ever raises or blocks."""

import logging
import os
import socket
import threading
from pathlib import Path
from typing import Iterator

import pytest
from shuttle_client.notify import notify

WAIT = 5.0  # bound on a datagram that was sent before we look


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket at a path, named by NOTIFY_SOCKET."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock


def test_fields_become_upper_case_lines_in_one_datagram(receiver: socket.socket) -> None:
    assert notify(ready="1", status="capturing 10.0.0.0/8")
    assert receiver.recv(4096) == b"READY=1\nSTATUS=capturing 10.0.0.0/8\n"
    assert notify(stopping="1")
    assert receiver.recv(4096) == b"STOPPING=1\n"


def test_a_newline_in_a_value_cannot_add_a_field(receiver: socket.socket) -> None:
    assert notify(status="lost\nREADY=1")
    assert receiver.recv(4096) == b"STATUS=lost READY=1\n"


def test_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"shuttle-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(f"\0{name}")
        sock.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
        assert notify(ready="1")
        assert sock.recv(4096) == b"READY=1\n"


def test_no_socket_is_a_quiet_no(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify(ready="1")
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert not notify(ready="1")


@pytest.mark.parametrize("address", ["/nonexistent/notify", "vsock:2:1234", "relative/path"])
def test_a_failure_is_logged_at_debug_and_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, address: str
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with caplog.at_level(logging.DEBUG, logger="shuttle"):
        assert not notify(ready="1")
    assert [record.levelno for record in caplog.records] == [logging.DEBUG]
    assert address in caplog.text


def test_a_manager_that_does_not_read_never_blocks_us(receiver: socket.socket) -> None:
    """Its queue fills up; then notify says False at once instead of waiting."""
    refused = threading.Event()

    def flood() -> None:
        for _ in range(100_000):
            if not notify(status="x" * 1000):
                refused.set()
                return

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    thread.join(WAIT * 4)
    receiver.close()  # would wake a blocked sender, so that the thread ends either way
    thread.join(WAIT)
    assert refused.is_set(), "notify blocked, or the queue never filled"

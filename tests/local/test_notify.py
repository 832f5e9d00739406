"""sd_notify: what arrives on a real NOTIFY_SOCKET, the cases where nothing is sent, and
that nothing ever raises or blocks; the real daemon's reports are in tests/firewalld/test_main."""

import logging
import secrets
import socket
import threading
from pathlib import Path
from typing import Iterator

import pytest
from shuttle_local.notify import Notifier

WAIT = 5.0  # bound on a datagram that was sent before we look
log = logging.getLogger("shuttle-test-notify")
notify = Notifier(log, logging.INFO)


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket where a service manager would listen, named in NOTIFY_SOCKET."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock


def test_fields_become_upper_case_lines_in_one_datagram(manager: socket.socket) -> None:
    assert notify(ready="1", status="capturing 10.0.0.0/8") is True
    assert manager.recv(4096) == b"READY=1\nSTATUS=capturing 10.0.0.0/8\n"
    assert notify(stopping="1") is True
    assert manager.recv(4096) == b"STOPPING=1\n"


def test_a_newline_in_a_value_cannot_start_another_field(manager: socket.socket) -> None:
    assert notify(status="lost\nREADY=1") is True
    assert manager.recv(4096) == b"STATUS=lost READY=1\n"


def test_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"shuttle-notify-test-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify(ready="1") is True
        assert sock.recv(4096) == b"READY=1\n"


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify(ready="1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify(ready="1") is False


@pytest.mark.parametrize("level", [logging.DEBUG, logging.WARNING])  # the client's, firewalld's
@pytest.mark.parametrize("address", ["relative/notify", "vsock:2:1234"])
def test_an_address_that_is_no_unix_socket_is_logged_at_the_level(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, address: str, level: int
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with caplog.at_level(logging.DEBUG, logger=log.name):
        assert Notifier(log, level)(ready="1") is False
    assert [record.levelno for record in caplog.records] == [level]
    assert f"NOTIFY_SOCKET {address!r} is not a unix socket address" in caplog.text


def test_a_failed_send_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "gone"
    monkeypatch.setenv("NOTIFY_SOCKET", str(missing))
    with caplog.at_level(logging.INFO, logger=log.name):
        assert notify(ready="1") is False
    assert [record.levelno for record in caplog.records] == [logging.INFO]
    assert f"cannot notify the service manager at {missing}: " in caplog.text


def test_a_manager_that_does_not_read_never_blocks_us(manager: socket.socket) -> None:
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
    manager.close()  # would wake a blocked sender, so that the thread ends either way
    thread.join(WAIT)
    assert refused.is_set(), "notify blocked, or the queue never filled"

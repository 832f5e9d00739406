"""sd_notify: the datagram a service manager gets, on a real unix socket, and the cases where
nothing is sent; the real daemon's reports are in test_main."""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from shuttle_firewalld.notify import notify

from .conftest import WAIT


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket where a service manager would listen, named in NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_fields_become_upper_case_lines_in_one_datagram(manager: socket.socket) -> None:
    assert notify(ready="1", status="listening; 0 sessions open") is True
    assert manager.recv(4096) == b"READY=1\nSTATUS=listening; 0 sessions open\n"


def test_a_newline_in_a_value_cannot_start_another_field(manager: socket.socket) -> None:
    assert notify(status="one\nREADY=1") is True
    assert manager.recv(4096) == b"STATUS=one READY=1\n"


def test_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"shuttle-notify-test-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify(stopping="1") is True
        assert sock.recv(4096) == b"STOPPING=1\n"


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify(ready="1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify(ready="1") is False


@pytest.mark.parametrize("address", ["relative/notify", "vsock:2:1234"])
def test_an_address_that_is_no_unix_socket_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, address: str
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    with caplog.at_level(logging.WARNING):
        assert notify(ready="1") is False
    assert f"NOTIFY_SOCKET {address!r} is not a unix socket address" in caplog.text


def test_a_failed_send_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "gone"
    monkeypatch.setenv("NOTIFY_SOCKET", str(missing))
    with caplog.at_level(logging.WARNING):
        assert notify(ready="1") is False
    assert f"cannot notify the service manager at {missing}: " in caplog.text

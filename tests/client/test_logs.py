"""Logging setup: stderr always, syslog with --syslog; a missing syslog is a warning."""

import logging
import os
import socket
from pathlib import Path
from typing import Iterator

import pytest
from shuttle_client.logs import configure, printable

WAIT = 5.0


@pytest.fixture(autouse=True)
def root_logger() -> Iterator[logging.Logger]:
    """The root logger as it was: configure() adds handlers to it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.mark.parametrize("socktype", [socket.SOCK_DGRAM, socket.SOCK_STREAM])
def test_a_line_reaches_the_syslog_socket(tmp_path: Path, socktype: int) -> None:
    path = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socktype) as server:
        server.bind(path)
        server.settimeout(WAIT)
        if socktype == socket.SOCK_STREAM:
            server.listen()
        configure(verbose=False, syslog=True, address=path)
        logging.getLogger("shuttle").info("ready: capturing 10.0.0.0/8")
        logging.getLogger("shuttle").debug("not at this level")
        if socktype == socket.SOCK_STREAM:
            connection, _ = server.accept()
            connection.settimeout(WAIT)
            with connection:
                received = connection.recv(4096)
        else:
            received = server.recv(4096)
    # <14>: facility user (1) * 8 + severity info (6); the ident names our pid.
    assert received == f"<14>shuttle-client[{os.getpid()}]: ready: capturing 10.0.0.0/8\0".encode()


def test_stderr_gets_the_lines_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stderr = configure(verbose=True, syslog=False)
    logging.getLogger("shuttle").debug("a debug line")
    assert capsys.readouterr().err == "shuttle-client: a debug line\n"
    assert isinstance(stderr, logging.StreamHandler)


def test_no_syslog_is_a_warning_and_stderr_carries_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure(verbose=False, syslog=True, address=str(tmp_path / "none"))
    logging.getLogger("shuttle").info("still here")
    assert capsys.readouterr().err == (
        f"shuttle-client: cannot log to syslog at {tmp_path}/none: No such file or directory; "
        "logging to stderr only\nshuttle-client: still here\n"
    )


def test_a_syslog_that_goes_away_costs_lines_not_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        configure(verbose=False, syslog=True, address=path)
    os.unlink(path)
    logging.getLogger("shuttle").info("into the void")
    assert capsys.readouterr().err == "shuttle-client: into the void\n"


def test_the_agents_text_cannot_drive_the_terminal() -> None:
    assert printable("ok \x1b[2J\x07 done\n") == "ok \\x1b[2J\\x07 done\\x0a"
    assert printable("café") == "café"

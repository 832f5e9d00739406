"""The readiness hook: systemd hears READY=1 and STOPPING=1, the callbacks run once."""

import socket
from pathlib import Path
from typing import List

import pytest
from shuttle_client.readiness import Readiness


def test_ready_notifies_and_runs_the_callbacks_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "notify")
    calls: List[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        readiness = Readiness([lambda: calls.append("first"), lambda: calls.append("second")])
        readiness.ready("capturing 10.0.0.0/8")
        readiness.ready("capturing 10.0.0.0/8 again")
        readiness.stopping()
        received = [sock.recv(4096) for _ in range(3)]
    assert calls == ["first", "second"]
    assert received == [
        b"READY=1\nSTATUS=capturing 10.0.0.0/8\n",
        b"READY=1\nSTATUS=capturing 10.0.0.0/8 again\n",
        b"STOPPING=1\n",
    ]


def test_without_a_manager_the_callbacks_still_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    calls: List[str] = []
    Readiness([lambda: calls.append("ready")]).ready("up")
    assert calls == ["ready"]

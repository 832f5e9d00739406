"""Counting connections from libzmq's monitor: a real ROUTER on a real ipc socket, raw unix
connections to it, and the ones over the total cap ended by the kernel's word."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from shuttle_firewalld.connections import Connections

from .daemon import wait_until


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Connections, str]]:
    path = str(tmp_path / "c.sock")
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    connections = Connections(router, path, limit=2)
    router.bind("ipc://" + path)
    try:
        yield connections, path
    finally:
        connections.close()
        router.close()
        context.term()


def ended(sock: socket.socket) -> bool:
    """Whether firewalld's side has gone (the connection reads its end)."""
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False


def test_connections_over_the_total_are_ended_and_not_counted(
    watched: tuple[Connections, str],
) -> None:
    connections, path = watched
    clients = []
    for _ in range(4):
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.setblocking(False)
        clients.append(client)

    def served() -> bool:
        connections.serve()
        return sum(map(ended, clients)) == 2

    try:
        assert wait_until(served)
        # The first two are counted, root's (this test's uid: no cap of its own); the others
        # were ended, and take no room.
        assert [ended(client) for client in clients] == [False, False, True, True]
        assert (len(connections), connections.of(0)) == (2, 2)
        clients[0].close()

        def forgotten() -> bool:
            connections.serve()
            return len(connections) == 1

        assert wait_until(forgotten)
    finally:
        for client in clients:
            client.close()

"""The echo server the comparison measures against; a standalone script (standard library
only).

    python3 echoserver.py HOST PORT

The bench runs it as root on the target host. It sends back every byte it receives until
EOF, for any number of connections, from one thread on epoll: it costs a few microseconds
per connection, so the connection rates the bench reports are the tunnels' (testbed's asyncio
echo server tops out near the rates the targets ask for). It prints "echoserver: listening"
when ready and runs until SIGTERM.
"""

from __future__ import annotations

import resource
import selectors
import signal
import socket
import sys

READ_SIZE = 65536
ACCEPT_BATCH = 256  # connections accepted per wake-up before the others get their turn


class Server:
    def __init__(self, host: str, port: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(socket.SOMAXCONN)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.unsent: dict[socket.socket, bytes] = {}  # what a full send buffer did not take
        self.stopping = False

    def accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _peer = self.listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.selector.register(conn, selectors.EVENT_READ)

    def readable(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(READ_SIZE)
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        self.send(conn, data)

    def send(self, conn: socket.socket, data: bytes) -> None:
        try:
            sent = conn.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close(conn)
            return
        if sent < len(data):
            # Stop reading until the peer takes what is waiting: bounded per connection.
            self.unsent[conn] = data[sent:]
            self.selector.modify(conn, selectors.EVENT_WRITE)
        elif conn in self.unsent:
            del self.unsent[conn]
            self.selector.modify(conn, selectors.EVENT_READ)

    def close(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        self.unsent.pop(conn, None)
        conn.close()

    def run(self) -> None:
        while not self.stopping:
            for key, _events in self.selector.select(timeout=0.5):
                conn = key.fileobj
                if conn is self.listener:
                    self.accept()
                elif isinstance(conn, socket.socket) and conn in self.unsent:
                    self.send(conn, self.unsent[conn])
                elif isinstance(conn, socket.socket):
                    self.readable(conn)


def main() -> int:
    if len(sys.argv) != 3:
        print("usage: echoserver.py HOST PORT", file=sys.stderr)
        return 2
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = Server(sys.argv[1], int(sys.argv[2]))

    def stop(_signum: int, _frame: object) -> None:
        server.stopping = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    print(f"echoserver: listening on {sys.argv[1]}:{sys.argv[2]}", flush=True)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

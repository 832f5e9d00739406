"""A hostile agent for tests: greets like shuttle-agent, then answers GetHosts with names
that must never reach a hosts file, and GetRoutes with routes that must not be captured.

Run on S in place of the server's python (`--python=COPY`, a copy with a shebang naming a
python that has shuttle_protocol): it reads and ignores the uploaded bundle, says Hello, and
answers by the copy's name: "...-invalid": raw msgpack the Hosts constructor would refuse (a
newline and a second entry inside a name); "...-shadowing": valid names that other lines of
the client's hosts file already hold or that no session may set (loopback and wpad names,
the ssh server's name), and one new name; "...-routes": routes that together cover
everything (ROUTES), one over the client's own link, and one worth capturing. (Its arguments
are stage 1's `-c CODE`, and sshd passes no environment: the name is what can choose.)
"""

import os
import sys

import msgpack
from shuttle_protocol import PROTOCOL_VERSION
from shuttle_protocol.stream import StreamDecoder, encode
from shuttle_protocol.stream_messages import GetHosts, GetRoutes, Hosts, Ping, Pong, Routes

INVALID = [["evil\n198.18.2.9 bank.shuttle.test", "198.18.2.2"], ["a b#c", "198.18.2.2"]]
SHADOWING = Hosts(
    (
        ("localhost", "198.18.2.2"),
        ("localhost.localdomain", "198.18.2.2"),
        ("ip6-loopback", "198.18.2.2"),
        ("wpad", "198.18.2.2"),
        ("wpad.shuttle.test", "198.18.2.2"),
        ("bank.shuttle.test", "198.18.2.2"),
        ("SSH-Server.shuttle.test", "198.18.2.2"),  # the name the client connects to
        ("new.shuttle.test", "198.18.2.2"),
    )
)
# Halves of each family, C's link inside a /16, and the target network (testbed.config).
ROUTES = Routes(
    ("0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1", "198.18.0.0/16", "198.18.2.0/24"), False
)
HELLO_TAG, HOSTS_TAG = 1, Hosts.TAG


def main() -> None:
    invalid = sys.argv[0].endswith("-invalid")
    stdin = sys.stdin.buffer
    stdin.read(int(stdin.readline()))  # the bundle: not run
    out = sys.stdout.buffer

    def send(value: object) -> None:
        out.write(msgpack.packb(value, use_bin_type=True))
        out.flush()

    send([HELLO_TAG, PROTOCOL_VERSION, ["tcp", "udp"], "hostile"])
    decoder = StreamDecoder()
    while True:
        chunk = os.read(0, 65536)
        if not chunk:
            return
        for msg in decoder.feed(chunk):
            if isinstance(msg, GetHosts):
                if invalid:
                    send([HOSTS_TAG, INVALID])
                else:
                    out.write(encode(SHADOWING))
                    out.flush()
            elif isinstance(msg, GetRoutes):
                out.write(encode(ROUTES))
                out.flush()
            elif isinstance(msg, Ping):
                out.write(encode(Pong(msg.cookie)))
                out.flush()


if __name__ == "__main__":
    main()

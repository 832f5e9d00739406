"""The ssh server's addresses, found through `ssh -G`, become whole-host excludes, and can
be pinned for reconnecting without DNS."""

import asyncio
from pathlib import Path
from typing import Optional, Sequence, Tuple

from shuttle_client.ssh_server import Server, find_server
from shuttle_protocol.firewall_messages import Target


async def excludes(
    ssh_cmd: Sequence[str], destination: str, port: Optional[int]
) -> Tuple[Target, ...]:
    return (await find_server(ssh_cmd, destination, port)).excludes


ALL = (1, 65535)


def fake_ssh(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-ssh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_the_hostname_ssh_would_use_is_excluded(tmp_path: Path) -> None:
    # As ~/.ssh/config can rename the host: the destination says "gw", ssh -G says where.
    ssh = fake_ssh(tmp_path, 'echo "user alice"; echo "hostname 127.0.0.1"; echo "port 22"\n')
    targets = asyncio.run(excludes([ssh], "alice@gw", None))
    assert targets == (("127.0.0.1/32", *ALL),)


def test_without_ssh_g_the_destination_itself_is_resolved(tmp_path: Path) -> None:
    ssh = fake_ssh(tmp_path, "exit 255\n")
    assert asyncio.run(excludes([ssh], "bob@::1", 2222)) == (("::1/128", *ALL),)
    assert asyncio.run(excludes(["/no/such/ssh"], "127.0.0.2", None)) == (("127.0.0.2/32", *ALL),)


def test_an_unresolvable_server_excludes_nothing(tmp_path: Path) -> None:
    ssh = fake_ssh(tmp_path, 'echo "hostname no-such-host.invalid"\n')
    assert asyncio.run(excludes([ssh], "x", None)) == ()


def test_pinned_options_connect_to_the_address_and_check_the_name() -> None:
    server = Server("gw.example", ("192.0.2.7", "2001:db8::7"))
    assert server.pinned() == ("-o", "HostName=192.0.2.7", "-o", "HostKeyAlias=gw.example")
    assert Server("192.0.2.7", ("192.0.2.7",)).pinned() == ()  # an address needs no DNS
    assert Server("gw.example", ()).pinned() == ()  # did not resolve: let ssh try

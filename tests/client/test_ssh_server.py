"""The ssh server's addresses, found through `ssh -G`, become whole-host excludes."""

import asyncio
from pathlib import Path

from shuttle_client.ssh_server import server_targets

ALL = (1, 65535)


def fake_ssh(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-ssh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_the_hostname_ssh_would_use_is_excluded(tmp_path: Path) -> None:
    # As ~/.ssh/config can rename the host: the destination says "gw", ssh -G says where.
    ssh = fake_ssh(tmp_path, 'echo "user alice"; echo "hostname 127.0.0.1"; echo "port 22"\n')
    targets = asyncio.run(server_targets([ssh], "alice@gw", None))
    assert targets == (("127.0.0.1/32", *ALL),)


def test_without_ssh_g_the_destination_itself_is_resolved(tmp_path: Path) -> None:
    ssh = fake_ssh(tmp_path, "exit 255\n")
    assert asyncio.run(server_targets([ssh], "bob@::1", 2222)) == (("::1/128", *ALL),)
    assert asyncio.run(server_targets(["/no/such/ssh"], "127.0.0.2", None)) == (
        ("127.0.0.2/32", *ALL),
    )


def test_an_unresolvable_server_excludes_nothing(tmp_path: Path) -> None:
    ssh = fake_ssh(tmp_path, 'echo "hostname no-such-host.invalid"\n')
    assert asyncio.run(server_targets([ssh], "x", None)) == ()

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


def write_config(tmp_path: Path) -> str:
    path = tmp_path / "ssh_config"
    path.write_text(
        f"""\
Host target
  HostName 127.0.0.5
  ProxyJump j1,alice@j2:2222
Host j1
  HostName 127.0.0.6
  ProxyJump j0
Host j0
  HostName 127.0.0.7
Host j2
  HostName 127.0.0.8
Host loop
  HostName 127.0.0.9
  ProxyJump loop
Host pc
  HostName 127.0.0.10
  ProxyCommand ssh -F {path} -o ConnectTimeout=3 -W %h:%p j0
Host nc
  HostName 127.0.0.11
  ProxyCommand nc 127.0.0.12 22
"""
    )
    return str(path)


def test_jump_hosts_are_excluded_through_real_ssh_g(tmp_path: Path) -> None:
    # The real ssh -G reads the config; ProxyJump's hops are followed through their own
    # config (j1 jumps through j0), and every one is excluded with the server.
    ssh = ["ssh", "-F", write_config(tmp_path)]
    server = asyncio.run(find_server(ssh, "target", None))
    assert server.addresses == ("127.0.0.5",)
    assert server.jumps == ("127.0.0.6", "127.0.0.8", "127.0.0.7")
    assert server.excludes == tuple((f"127.0.0.{n}/32", *ALL) for n in (5, 6, 8, 7))


def test_the_ssh_of_a_proxy_command_is_followed(tmp_path: Path) -> None:
    ssh = ["ssh", "-F", write_config(tmp_path)]
    assert asyncio.run(find_server(ssh, "pc", None)).jumps == ("127.0.0.7",)
    # Another program's destination is not guessed at.
    assert asyncio.run(find_server(ssh, "nc", None)).jumps == ()


def test_a_jump_loop_ends(tmp_path: Path) -> None:
    ssh = ["ssh", "-F", write_config(tmp_path)]
    assert asyncio.run(find_server(ssh, "loop", None)).jumps == ("127.0.0.9",)


def test_the_excludes_cover_ssh_only_where_every_hop_is_known(tmp_path: Path) -> None:
    """covered: the rules may go in before ssh connects, only where the excludes hold every
    address ssh may connect to on its way."""
    answering = fake_ssh(tmp_path, 'echo "hostname 127.0.0.1"\n')
    assert asyncio.run(find_server([answering], "gw", None)).covered
    ssh = ["ssh", "-F", write_config(tmp_path)]
    assert asyncio.run(find_server(ssh, "target", None)).covered  # every ProxyJump hop
    assert asyncio.run(find_server(ssh, "pc", None)).covered  # the ssh of a ProxyCommand
    assert not asyncio.run(find_server(ssh, "nc", None)).covered  # another program's
    assert not asyncio.run(find_server(["/no/such/ssh"], "127.0.0.2", None)).covered
    unresolved = fake_ssh(tmp_path, 'echo "hostname no-such-host.invalid"\n')
    assert not asyncio.run(find_server([unresolved], "x", None)).covered

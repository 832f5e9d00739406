"""sshuttle's habits on shuttle's command line: -V, a counted -v, --disable-ipv6, -l with
several addresses, --python's fallback to python, no password in -r, and a forgotten -r
said in one line."""

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from docopt import DocoptExit
from shuttle_client import plan
from shuttle_client.argfiles import parse_command_line
from shuttle_client.cli import UsageError, parse_args, parse_remote
from shuttle_client.resolvers import local_resolvers
from shuttle_client.tunnel import TunnelError
from shuttle_protocol.firewall_messages import ALL_PORTS
from shuttle_protocol.stream_messages import Routes

from .agents import run
from .agents import start as start_tunnel
from .test_discovery import new_discovery

CLIENT = str(Path(sys.executable).with_name("shuttle-client"))
PYTHON3 = "/usr/bin/python3"
# A second interpreter, of another version, to tell which one the fallback ran.
OTHER_PYTHON = "/root/.pyenv/versions/3.8.18/bin/python3"


def client(*args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([CLIENT, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(flag: str) -> None:
    result = client(flag)
    assert (result.returncode, result.stdout.split()[0]) == (0, "shuttle-client")
    assert result.stdout.split()[1][0].isdigit()


@pytest.mark.parametrize(
    ("flags", "ssh"),
    [
        ([], ("ssh",)),
        (["-v"], ("ssh",)),
        (["-vv"], ("ssh", "-v")),
        (["-v", "--verbose"], ("ssh", "-v")),
        (["-vvv"], ("ssh", "-vv")),
        (["-vvvvvv"], ("ssh", "-vvv")),
    ],
)
def test_v_is_counted_and_vv_adds_ssh_debug(flags: List[str], ssh: Tuple[str, ...]) -> None:
    # Through the @file layer, as main parses: it must not merge -v -v into one.
    options = parse_command_line([*flags, "-r", "gw", "10.0.0.0/8"], {})
    assert options.verbose == bool(flags)
    assert options.ssh_cmd == ssh


def test_disable_ipv6_leaves_ipv6_out() -> None:
    options = parse_args(
        ["--disable-ipv6", "-r", "gw", "10.0.0.0/8", "::/0", "-x", "fd00::/8", "-x", "10.1.0.0/16"]
    )
    assert options.disable_ipv6
    assert options.subnets == (("10.0.0.0/8", 1, 65535),)
    assert options.excludes == (("10.1.0.0/16", 1, 65535),)
    assert options.listen == (("127.0.0.1", 0),)
    with pytest.raises(UsageError, match="every SUBNET is IPv6"):
        parse_args(["--disable-ipv6", "-r", "gw", "::/0"])
    with pytest.raises(UsageError, match=r"-l \[::1\]:0: an IPv6 address"):
        parse_args(["--disable-ipv6", "-r", "gw", "-l", "127.0.0.1:0,[::1]:0", "10.0.0.0/8"])
    with pytest.raises(UsageError, match="--ns-hosts has an IPv6 address"):
        parse_args(["--disable-ipv6", "-r", "gw", "--ns-hosts", "::1", "10.0.0.0/8"])


def test_listen_takes_several_addresses_as_sshuttle() -> None:
    options = parse_args(["-r", "gw", "-l", "127.0.0.1:0,[::1]:0", "10.0.0.0/8", "::/0"])
    assert options.listen == (("127.0.0.1", 0), ("::1", 0))
    options = parse_args(["-r", "gw", "-l", "0.0.0.0:1234,[::]:1234", "10.0.0.0/8", "::/0"])
    assert options.listen == (("0.0.0.0", 1234), ("::", 1234))
    assert options.forward
    options = parse_args(["-r", "gw", "-l", "10.9.9.9:5,5,127.0.0.1:5", "10.0.0.0/8"])
    assert options.listen == (("10.9.9.9", 5), ("127.0.0.1", 5), ("::1", 5))
    with pytest.raises(UsageError, match="the same port"):
        parse_args(["-r", "gw", "-l", "127.0.0.1:1,[::1]:2", "10.0.0.0/8"])
    with pytest.raises(UsageError, match="invalid listen address 'nowhere:1'"):
        parse_args(["-r", "gw", "-l", "127.0.0.1:1,nowhere:1", "10.0.0.0/8"])


def test_a_password_in_remote_is_refused_without_repeating_it() -> None:
    with pytest.raises(UsageError, match="no password on the command line") as caught:
        parse_remote("alice:s3cret@gw.example:2222")
    assert "s3cret" not in str(caught.value)
    assert parse_remote("alice@[::1]:2222") == ("alice@::1", 2222)  # a colon in the host


def test_a_forgotten_remote_is_one_clear_line() -> None:
    result = client("10.0.0.0/8")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "shuttle-client: error: no -r HOST: which ssh server to go through? e.g. "
        "shuttle-client -r [user@]host[:port] 10.0.0.0/8"
    ]
    # Another mistake of docopt's gets docopt's text, with the real usage (-r not optional).
    with pytest.raises(DocoptExit, match=r"\[options\] \[-v\]\.\.\. -r HOST"):
        parse_args(["-r", "gw", "-r", "gw2", "10.0.0.0/8"])
    wrong = client("-r", "gw", "--no-such-option", "10.0.0.0/8")  # other mistakes: their own
    assert wrong.stderr == "shuttle-client: error: unknown option --no-such-option\n"


def fake_path(tmp_path: Path, pythons: Dict[str, str]) -> str:
    """A directory for PATH with sh and the given python names, symlinks to interpreters."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "sh").symlink_to("/bin/sh")
    for name, target in pythons.items():
        (folder / name).symlink_to(target)
    return str(folder)


def version_of(python: str) -> str:
    script = "import sys; print('.'.join(map(str, sys.version_info[:3])))"
    return subprocess.run(
        [python, "-c", script], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()


@pytest.mark.parametrize(
    ("pythons", "expected"),
    [
        ({"python3": PYTHON3, "python": OTHER_PYTHON}, PYTHON3),
        ({"python": OTHER_PYTHON}, OTHER_PYTHON),
    ],
)
def test_without_python_option_python3_else_python(
    fake_ssh: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pythons: Dict[str, str],
    expected: str,
) -> None:
    monkeypatch.setenv("PATH", fake_path(tmp_path, pythons))

    version = version_of(expected)

    async def scenario() -> None:
        tunnel = await start_tunnel(fake_ssh, None)
        await tunnel.stop()
        assert tunnel.agent_python == version

    run(scenario())


def test_neither_python3_nor_python_is_one_line(
    fake_ssh: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", fake_path(tmp_path, {}))

    async def scenario() -> None:
        with pytest.raises(TunnelError, match="python3 or python was not found on the server"):
            await start_tunnel(fake_ssh, None)

    run(scenario())


def test_disable_ipv6_leaves_out_the_servers_ipv6_routes_and_resolvers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 2001:db8::53\nnameserver 192.0.2.53\n")
    no_upstreams = str(tmp_path / "no-resolved")
    monkeypatch.setattr(
        plan, "local_resolvers", lambda: local_resolvers(str(resolv_conf), no_upstreams)
    )
    options = parse_args(["--disable-ipv6", "-r", "gw", "-N", "--dns", "--to-ns", "192.0.2.1"])

    async def scenario() -> None:
        discovery, failures = new_discovery()
        planning = asyncio.ensure_future(plan.make_plan(options, discovery))
        await asyncio.sleep(0)
        discovery.on_message(Routes(("198.51.100.0/24", "2001:db8:5::/48"), False))
        made = await asyncio.wait_for(planning, 10)
        assert made.subnets == (("198.51.100.0/24", *ALL_PORTS),)
        assert made.dns == ("192.0.2.53",)
        assert failures == []

    asyncio.run(scenario())

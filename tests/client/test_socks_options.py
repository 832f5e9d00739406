"""--socks, --socks-auth and --http-proxy on the command line: what they parse to, and the
clear errors for what would open the tunnel to others or cannot work."""

from pathlib import Path

import pytest
from shuttle_client.cli import UsageError, parse_args


def auth_file(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "auth"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_proxies_alone_need_no_subnet() -> None:
    options = parse_args(["-r", "h", "--socks", "1080", "--http-proxy", "[::1]:3128"])
    assert options.socks == ("127.0.0.1", 1080)
    assert options.http_proxy == ("::1", 3128)
    assert not options.captures


def test_a_wildcard_socks_address_needs_a_password(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"not a loopback address.*--socks-auth"):
        parse_args(["-r", "h", "--socks", "0.0.0.0:1080"])
    path = auth_file(tmp_path, "alice:s3:cret\n")
    options = parse_args(["-r", "h", "--socks", "[::]:1080", "--socks-auth", path, "10.0.0.0/8"])
    assert options.socks == ("::", 1080) and options.captures
    assert options.socks_auth == (b"alice", b"s3:cret")


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ("alice:pw\n", 0o644, "others may read it"),
        ("no colon\n", 0o600, "username:password"),
        (":pw\n", 0o600, "username:password"),
        ("alice:\n", 0o600, "username:password"),
        ("a" * 300 + ":pw\n", 0o600, "username:password"),
    ],
)
def test_bad_auth_files(tmp_path: Path, text: str, mode: int, message: str) -> None:
    path = auth_file(tmp_path, text, mode)
    with pytest.raises(UsageError, match=message):
        parse_args(["-r", "h", "--socks", "1080", "--socks-auth", path])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--socks", "1", "--socks-auth", "/nonexistent"], "/nonexistent: No such file"),
        (["--http-proxy", "0.0.0.0:3128"], "loopback only"),
        (["--socks", "localhost:1080"], "expected \\[ip:\\]port"),
        (["--socks", "70000"], "expected \\[ip:\\]port"),
        (["--socks-auth", "/x"], "--socks-auth needs --socks"),
        (["--socks", "1", "--dns"], "give a SUBNET or -N too"),
        ([], "nothing to capture"),
    ],
)
def test_bad_proxy_options(args: list, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_args(["-r", "h", *args])

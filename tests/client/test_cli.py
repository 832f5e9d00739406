"""The command line: what is accepted, what is refused and how it is said."""

import pytest
from docopt import DocoptExit
from shuttle_client.cli import UsageError, parse_args, parse_listen, parse_remote, parse_subnet


def test_minimal_command_line() -> None:
    options = parse_args(["-r", "alice@gw.example:2222", "10.1.0.0/16", "10.2.3.4"])
    assert options.ssh_destination == "alice@gw.example"
    assert options.ssh_port == 2222
    assert options.subnets == ("10.1.0.0/16", "10.2.3.4/32")
    assert options.excludes == ()
    assert options.listen == ("127.0.0.1", 0)
    assert options.ssh_cmd == ("ssh",)
    assert options.python == "python3"
    assert options.method == "nat"


def test_all_options() -> None:
    options = parse_args(
        [
            "-r", "gw", "-x", "10.1.2.0/24", "--exclude", "10.1.3.3", "-l", "0.0.0.0:12300",
            "-e", "ssh -i 'my key' -o BatchMode=yes", "--python", "/usr/bin/python3.11",
            "--firewalld", "/tmp/fw.sock", "-v", "10.1.0.0/16",
        ]
    )  # fmt: skip
    assert options.excludes == ("10.1.2.0/24", "10.1.3.3/32")
    assert options.listen == ("0.0.0.0", 12300)
    assert options.ssh_cmd == ("ssh", "-i", "my key", "-o", "BatchMode=yes")
    assert options.python == "/usr/bin/python3.11"
    assert options.firewalld == "/tmp/fw.sock"
    assert options.verbose


def test_subnet_host_bits_are_cleared_and_duplicates_merged() -> None:
    assert parse_subnet("10.1.2.3/16") == "10.1.0.0/16"
    assert parse_args(["-r", "h", "10.0.0.1/8", "10.0.0.0/8"]).subnets == ("10.0.0.0/8",)


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "300.1.1.1", "nonsense", "", "10.0.0.0/"])
def test_bad_subnet_names_the_entry(bad: str) -> None:
    with pytest.raises(UsageError, match="invalid subnet"):
        parse_args(["-r", "h", bad])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host", ("host", None)),
        ("user@host", ("user@host", None)),
        ("user@host:22", ("user@host", 22)),
        ("[2001:db8::1]:2222", ("2001:db8::1", 2222)),
        ("u@[2001:db8::1]", ("u@2001:db8::1", None)),
        ("2001:db8::1", ("2001:db8::1", None)),
    ],
)
def test_remote_forms(text: str, expected: tuple) -> None:
    assert parse_remote(text) == expected


@pytest.mark.parametrize("bad", ["@host", "host:0", "host:99999", "host:x", "[::1", ""])
def test_bad_remote(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_remote(bad)


def test_listen_forms() -> None:
    assert parse_listen("12300") == ("127.0.0.1", 12300)
    assert parse_listen("[::1]:0") == ("::1", 0)
    with pytest.raises(UsageError):
        parse_listen("localhost:1")
    with pytest.raises(UsageError):
        parse_listen("1.2.3.4:70000")


def test_unknown_method_and_empty_ssh_cmd() -> None:
    with pytest.raises(UsageError, match="method"):
        parse_args(["-r", "h", "--method", "pf", "10.0.0.0/8"])
    with pytest.raises(UsageError, match="ssh-cmd"):
        parse_args(["-r", "h", "-e", "", "10.0.0.0/8"])
    with pytest.raises(UsageError, match="ssh-cmd"):
        parse_args(["-r", "h", "-e", "ssh 'unclosed", "10.0.0.0/8"])


def test_missing_remote_or_subnet_is_a_usage_error() -> None:
    with pytest.raises(DocoptExit):
        parse_args(["10.0.0.0/8"])
    with pytest.raises(DocoptExit):
        parse_args(["-r", "host"])

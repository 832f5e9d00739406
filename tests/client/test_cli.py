"""The command line: what is accepted, what is refused and how it is said."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from shuttle_client.cli import UsageError, parse_args, parse_listen, parse_remote
from shuttle_protocol.firewall_messages import ANY_OWNER


def test_minimal_command_line() -> None:
    options = parse_args(["-r", "alice@gw.example:2222", "10.1.0.0/16", "10.2.3.4"])
    assert options.ssh_destination == "alice@gw.example"
    assert options.ssh_port == 2222
    assert options.subnets == (("10.1.0.0/16", 1, 65535), ("10.2.3.4/32", 1, 65535))
    assert options.excludes == ()
    assert options.listen == (("127.0.0.1", 0), ("::1", 0))
    assert not options.forward
    assert options.ssh_cmd == ("ssh",)
    assert options.python is None  # python3, else python (test_upload)
    assert options.method == "auto"
    assert (options.uid, options.gid) == (os.getuid(), ANY_OWNER)
    # Not named: where nothing answers, the client starts a private one through sudo.
    assert (options.firewalld, options.firewalld_named) == ("/run/shuttle/firewalld.sock", False)


def test_all_options() -> None:
    options = parse_args(
        [
            "-r", "gw", "-x", "10.1.2.0/24", "--exclude", "10.1.3.3", "-l", "0.0.0.0:12300",
            "-e", "ssh -i 'my key' -o BatchMode=yes", "--python", "/usr/bin/python3.11",
            "--firewalld", "/tmp/fw.sock", "-v", "10.1.0.0/16",
        ]
    )  # fmt: skip
    assert options.excludes == (("10.1.2.0/24", 1, 65535), ("10.1.3.3/32", 1, 65535))
    assert options.listen == (("0.0.0.0", 12300),)
    assert options.forward
    assert options.ssh_cmd == ("ssh", "-i", "my key", "-o", "BatchMode=yes")
    assert options.python == "/usr/bin/python3.11"
    assert (options.firewalld, options.firewalld_named) == ("/tmp/fw.sock", True)
    assert options.verbose


def test_duplicates_are_merged() -> None:
    options = parse_args(["-r", "h", "10.0.0.1/8", "10.0.0.0/8"])
    assert options.subnets == (("10.0.0.0/8", 1, 65535),)


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "300.1.1.1", "no such host!", "10.0.0.0/"])
def test_bad_subnet_names_the_entry(bad: str) -> None:
    with pytest.raises(UsageError, match="invalid subnet"):
        parse_args(["-r", "h", bad])


def test_subnet_and_exclude_files(tmp_path: Path) -> None:
    includes = tmp_path / "includes"
    includes.write_text("# office\n10.1.0.0/16 10.2.0.0/16:443\n\n[fd00::]/8:22  # v6\n")
    excludes = tmp_path / "excludes"
    excludes.write_text("10.1.2.3\n")
    options = parse_args(["-r", "h", "-s", str(includes), "-X", str(excludes), "10.9.0.0/16"])
    assert options.subnets == (
        ("10.9.0.0/16", 1, 65535),
        ("10.1.0.0/16", 1, 65535),
        ("10.2.0.0/16", 443, 443),
        ("fd00::/8", 22, 22),
    )
    assert options.excludes == (("10.1.2.3/32", 1, 65535),)


def test_a_bad_line_in_a_file_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "excludes"
    path.write_text("10.1.2.3\n# fine\n10.1.2.300\n")
    with pytest.raises(UsageError, match=f"{path}, line 3: invalid subnet '10.1.2.300'"):
        parse_args(["-r", "h", "-X", str(path), "10.0.0.0/8"])
    with pytest.raises(UsageError, match="cannot read /nonexistent"):
        parse_args(["-r", "h", "-s", "/nonexistent"])


def test_nothing_to_capture() -> None:
    with pytest.raises(UsageError, match="nothing to capture"):
        parse_args(["-r", "h"])


def test_owner_options() -> None:
    assert (parse_args(["-r", "h", "--user", "root", "0/0"]).uid) == 0
    options = parse_args(["-r", "h", "--group", "root", "0/0"])
    assert (options.uid, options.gid) == (ANY_OWNER, 0)
    options = parse_args(["-r", "h", "--user", "0", "--group", "0", "0/0"])
    assert (options.uid, options.gid) == (0, 0)
    assert parse_args(["-r", "h", "--all-users", "0/0"]).uid == ANY_OWNER
    with pytest.raises(UsageError, match="no such user"):
        parse_args(["-r", "h", "--user", "no-such-user-here", "0/0"])
    with pytest.raises(UsageError, match="no such group"):
        parse_args(["-r", "h", "--group", "no-such-group-here", "0/0"])
    with pytest.raises(UsageError, match="exclude each other"):
        parse_args(["-r", "h", "--all-users", "--user", "root", "0/0"])


def test_the_default_owner_is_ourselves_as_firewalld_sees_us() -> None:
    assert parse_args(["-r", "h", "0/0"]).uid == os.getuid()
    if os.geteuid() != 0:
        pytest.skip("needs root for setpriv")
    # In a user namespace of ours (unshare -r), 0 in there, the uid outside is ours.
    code = "from shuttle_client.cli import parse_args; print(parse_args(['-r', 'h', '0/0']).uid)"
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    done = subprocess.run(
        [*nobody, "unshare", "--map-root-user", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "65534\n", "")


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


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (
            ["-l", "[::]:12300", "10.0.0.0/8"],
            "-l [::]:12300 listens for IPv6 only (the client's IPv6 listeners are IPV6_V6ONLY), "
            "but IPv4 is captured (10.0.0.0/8): use -l 0.0.0.0:12300 for IPv4, or no -l for "
            "both on the loopback addresses",
        ),
        (
            ["-l", "[::1]:0", "fd00::/8", "10.1.0.0/16:80"],
            "-l [::1]:0 listens for IPv6 only (the client's IPv6 listeners are IPV6_V6ONLY), "
            "but IPv4 is captured (10.1.0.0/16): use -l 0.0.0.0:0 for IPv4, or no -l for "
            "both on the loopback addresses",
        ),
        (
            ["-l", "[::]:12300", "--ns-hosts", "192.0.2.53", "fd00::/8"],
            "-l [::]:12300 listens for IPv6 only (the client's IPv6 listeners are IPV6_V6ONLY), "
            "but IPv4 is captured (192.0.2.53): use -l 0.0.0.0:12300 for IPv4, or no -l for "
            "both on the loopback addresses",
        ),
        (
            ["-l", "0.0.0.0:12300", "10.0.0.0/8", "2001:db8::/32"],
            "-l 0.0.0.0:12300 listens for IPv4 only (the client's IPv6 listeners are "
            "IPV6_V6ONLY), but IPv6 is captured (2001:db8::/32): use -l [::]:12300 for IPv6, "
            "or no -l for both on the loopback addresses",
        ),
    ],
)
def test_a_listen_address_must_take_each_family_captured(args: list[str], problem: str) -> None:
    with pytest.raises(UsageError) as refused:
        parse_args(["-r", "gw", *args])
    assert str(refused.value) == problem


@pytest.mark.parametrize(
    "args",
    [
        ["-l", "[::]:12300", "fd00::/8"],
        ["-l", "0.0.0.0:12300", "10.0.0.0/8"],
        ["-l", "12300", "10.0.0.0/8", "fd00::/8"],
        ["-l", "[::]:12300", "--method", "tproxy", "10.0.0.0/8"],  # firewalld's listeners
        ["-l", "[::]:12300", "-N"],  # the routes are not known yet: firewalld checks them
    ],
)
def test_listen_addresses_that_take_each_family_captured(args: list[str]) -> None:
    assert parse_args(["-r", "gw", *args]).listen


def test_listen_forms() -> None:
    assert parse_listen("12300") == (("127.0.0.1", 12300), ("::1", 12300))
    assert parse_listen("[::1]:0") == (("::1", 0),)
    assert parse_listen(None) == (("127.0.0.1", 0), ("::1", 0))
    with pytest.raises(UsageError):
        parse_listen("localhost:1")
    with pytest.raises(UsageError):
        parse_listen("1.2.3.4:70000")


def test_methods() -> None:
    for method in ("auto", "nft", "nat"):
        assert parse_args(["-r", "h", "--method", method, "0/0"]).method == method


def test_unknown_method_and_empty_ssh_cmd() -> None:
    with pytest.raises(UsageError, match="method"):
        parse_args(["-r", "h", "--method", "pf", "10.0.0.0/8"])
    with pytest.raises(UsageError, match="ssh-cmd"):
        parse_args(["-r", "h", "-e", "", "10.0.0.0/8"])
    with pytest.raises(UsageError, match="ssh-cmd"):
        parse_args(["-r", "h", "-e", "ssh 'unclosed", "10.0.0.0/8"])


def test_missing_remote_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="no -r HOST"):
        parse_args(["10.0.0.0/8"])


def test_streams_default_to_one_and_take_a_bounded_number() -> None:
    assert parse_args(["-r", "h", "10.0.0.0/8"]).streams == 1
    assert parse_args(["-r", "h", "--streams=4", "10.0.0.0/8"]).streams == 4
    assert parse_args(["-r", "h", "--streams", "16", "10.0.0.0/8"]).streams == 16


@pytest.mark.parametrize("bad", ["0", "17", "-1", "two", "", "1.5"])
def test_a_bad_streams_count_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError, match="--streams"):
        parse_args(["-r", "h", f"--streams={bad}", "10.0.0.0/8"])


def test_auto_nets_needs_no_subnet() -> None:
    options = parse_args(["-r", "h", "-N"])
    assert options.auto_nets and options.subnets == ()
    assert not parse_args(["-r", "h", "10.0.0.0/8"]).auto_nets


def test_dns_options() -> None:
    plain = parse_args(["-r", "h", "10.0.0.0/8"])
    assert (plain.dns, plain.ns_hosts, plain.to_ns) == (False, (), None)
    dns = parse_args(["-r", "h", "--dns", "10.0.0.0/8"])
    assert (dns.dns, dns.ns_hosts, dns.to_ns) == (True, (), None)
    ns_hosts = parse_args(["-r", "h", "--ns-hosts", "10.0.0.53,2001:DB8::53", "10.0.0.0/8"])
    assert (ns_hosts.dns, ns_hosts.ns_hosts) == (True, ("10.0.0.53", "2001:db8::53"))
    to_ns = parse_args(["-r", "h", "--dns", "--to-ns=[2001:db8::53]:5353", "10.0.0.0/8"])
    assert to_ns.to_ns == ("2001:db8::53", 5353)
    assert parse_args(["-r", "h", "--dns", "--to-ns=10.1.0.53", "-N"]).to_ns == ("10.1.0.53", 53)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ns-hosts", "ns.example"], "invalid --ns-hosts"),
        (["--ns-hosts", ","], "--ns-hosts is empty"),
        (["--to-ns", "10.0.0.53"], "--to-ns needs --dns or --ns-hosts"),
        (["--dns", "--to-ns", "ns.example"], "invalid --to-ns"),
        (["--dns", "--to-ns", "10.0.0.53:99999"], "invalid --to-ns"),
    ],
)
def test_bad_dns_options(argv: list, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_args(["-r", "h", *argv, "10.0.0.0/8"])


def test_auto_hosts_and_seed_hosts() -> None:
    options = parse_args(["-r", "h", "-H", "--seed-hosts", "db1, web.corp.example,db1", "-N"])
    assert options.auto_hosts
    assert options.seed_hosts == ("db1", "web.corp.example")
    assert parse_args(["-r", "h", "-N"]).seed_hosts == ()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed-hosts", "db1"], "needs -H"),
        (["-H", "--seed-hosts", ","], "--seed-hosts is empty"),
        (["-H", "--seed-hosts", "db_1"], "not a valid host name"),
        (["-H", "--seed-hosts", "db1\nevil"], "not a valid host name"),
    ],
)
def test_bad_seed_hosts(argv: list, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_args(["-r", "h", *argv, "10.0.0.0/8"])

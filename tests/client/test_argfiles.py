"""@file config files and SHUTTLE_CLIENT_ARGS: the format, the precedence, and mistakes
named by file and line."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Sequence

import pytest
from shuttle_client.argfiles import (
    ENVIRONMENT,
    MAX_DEPTH,
    SPECS,
    named_namespace,
    parse_command_line,
    split_line,
)
from shuttle_client.cli import Options, UsageError

NET = ("10.0.0.0/8", 1, 65535)


def parse(argv: Sequence[str], environ: Mapping[str, str] = {}) -> Options:
    return parse_command_line(argv, environ)


def write(path: Path, *lines: str) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_one_argument_per_line_with_comments_and_blank_lines(tmp_path: Path) -> None:
    conf = write(
        tmp_path / "work.conf",
        "# the office network",
        "-r",
        "alice@gw.example:2222",
        "",
        "   # indented comment",
        "--method=nft",
        "-e",
        "ssh -i '/home/alice/my key' -o BatchMode=yes",
        "10.0.0.0/8",
    )
    options = parse([f"@{conf}"])
    assert (options.ssh_destination, options.ssh_port) == ("alice@gw.example", 2222)
    assert options.method == "nft"
    assert options.ssh_cmd == ("ssh", "-i", "/home/alice/my key", "-o", "BatchMode=yes")
    assert options.subnets == (NET,)


def test_an_option_and_its_value_on_one_line(tmp_path: Path) -> None:
    conf = write(
        tmp_path / "c",
        "--remote alice@gw",
        "-x   10.1.0.0/16  ",
        "--ssh-cmd ssh -p 2222 -o ConnectTimeout=5",
        "--python=/usr/bin/python3 -X",  # '=' first: the whole line is one argument
        "-vN",
    )
    options = parse([f"@{conf}"])
    assert options.ssh_destination == "alice@gw"
    assert options.excludes == (("10.1.0.0/16", 1, 65535),)
    assert options.ssh_cmd == ("ssh", "-p", "2222", "-o", "ConnectTimeout=5")
    assert options.python == "/usr/bin/python3 -X"
    assert options.verbose and options.auto_nets


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("10.0.0.0/8", ["10.0.0.0/8"]),
        ("ssh -i key", ["ssh -i key"]),
        ("--dns", ["--dns"]),
        ("--method\tnft", ["--method", "nft"]),
        ("-e ssh -i key", ["-e", "ssh -i key"]),
        ("--ssh-cmd=ssh -i key", ["--ssh-cmd=ssh -i key"]),
    ],
)
def test_split_line(line: str, words: list) -> None:
    assert split_line(line) == words


def test_the_command_line_overrides_the_variable_and_repeatables_add_up(tmp_path: Path) -> None:
    environ = {ENVIRONMENT: "--method=nat -x 10.9.0.0/16 --python '/opt/py 3/bin/python3' -r gw"}
    options = parse(["--method", "nft", "-x", "10.8.0.0/16", "10.0.0.0/8"], environ)
    assert options.method == "nft"
    assert options.python == "/opt/py 3/bin/python3"
    assert options.ssh_destination == "gw"
    assert options.excludes == (("10.9.0.0/16", 1, 65535), ("10.8.0.0/16", 1, 65535))
    assert parse(["-r", "h", "10.0.0.0/8"], environ).ssh_destination == "h"


def test_later_wins_between_file_and_command_line(tmp_path: Path) -> None:
    conf = write(tmp_path / "c", "-r gw", "--method nat", "--streams=2", "10.0.0.0/8")
    assert parse([f"@{conf}", "--method=nft"]).method == "nft"
    assert parse(["--method=nft", f"@{conf}"]).method == "nat"
    # An abbreviated long option (docopt takes any unambiguous prefix) is the same option.
    assert parse([f"@{conf}", "--str", "3"]).streams == 3
    options = parse([f"@{conf}", "10.1.0.0/16"], {ENVIRONMENT: "10.2.0.0/16"})
    assert options.subnets == (
        ("10.2.0.0/16", 1, 65535),
        NET,
        ("10.1.0.0/16", 1, 65535),
    )


def test_the_namespace_is_read_before_the_rest_and_checked(tmp_path: Path) -> None:
    # Before any host name of the SUBNETs is resolved: this one resolves nowhere.
    conf = write(tmp_path / "c", "-r gw", "--namespace=vpn", "no-such-host.invalid")
    assert named_namespace([f"@{conf}"], {}) == "vpn"
    assert named_namespace([f"@{conf}", "--namespace", "other"], {}) == "other"
    assert named_namespace(["-r", "gw", "10.0.0.0/8"], {ENVIRONMENT: "--namespace=env"}) == "env"
    assert named_namespace(["-r", "gw", "10.0.0.0/8"], {}) is None
    for bad in ("", ".", "..", "a/b", "x" * 256):
        with pytest.raises(UsageError, match=r"^invalid --namespace "):
            named_namespace(["-r", "gw", "--namespace", bad, "10.0.0.0/8"], {})


def test_nested_files_relative_to_the_including_file(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    write(tmp_path / "conf.d" / "common", "-r gw", "--method=nft")
    conf = write(tmp_path / "conf.d" / "work", "@common", "10.0.0.0/8")
    options = parse([f"@{conf}"])
    assert (options.ssh_destination, options.method, options.subnets) == ("gw", "nft", (NET,))


def test_a_loop_of_files_and_deep_nesting_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "a", "@b")
    write(tmp_path / "b", "-r gw", "@a")
    with pytest.raises(UsageError, match=f"^{tmp_path}/b:2: @a includes itself$"):
        parse([f"@{tmp_path}/a"])
    for depth in range(MAX_DEPTH + 1):
        write(tmp_path / f"n{depth}", f"@n{depth + 1}")
    write(tmp_path / f"n{MAX_DEPTH + 1}", "-r gw", "10.0.0.0/8")
    with pytest.raises(UsageError, match=f"nested deeper than {MAX_DEPTH}"):
        parse([f"@{tmp_path}/n0"])


def test_a_bad_value_names_file_line_and_problem(tmp_path: Path) -> None:
    conf = write(tmp_path / "work.conf", "-r gw", "# next", "--method foo", "10.0.0.0/8")
    expected = f"{conf}:3: invalid --method 'foo': choose auto, nft, nat, tproxy"
    with pytest.raises(UsageError) as caught:
        parse([f"@{conf}"])
    assert str(caught.value) == expected


@pytest.mark.parametrize(
    ("lines", "line", "problem"),
    [
        (["10.0.0.0/8", "10.1.2.300"], 3, "invalid subnet '10.1.2.300'"),
        (["-x", "10.1.2.0/33", "10.0.0.0/8"], 3, "invalid subnet '10.1.2.0/33'"),
        (["--streams 99", "10.0.0.0/8"], 2, "invalid --streams '99'"),
        (["--to-ns 10.0.0.53", "10.0.0.0/8"], 2, "--to-ns needs --dns or --ns-hosts"),
        (["--frobnicate", "10.0.0.0/8"], 2, "unknown option --frobnicate"),
        (["--s=1", "10.0.0.0/8"], 2, "ambiguous option --s: "),
        (["-Z", "10.0.0.0/8"], 2, "unknown option -Z"),
        (["--dns=yes", "10.0.0.0/8"], 2, "--dns takes no value"),
        (["10.0.0.0/8", "-x"], 3, "-x needs a value"),
        (["--", "10.0.0.0/8"], 2, "'--' is no argument of shuttle-client"),
        (["--user no-such-user-here", "10.0.0.0/8"], 2, "no such user: 'no-such-user-here'"),
    ],
)
def test_mistakes_in_a_file(tmp_path: Path, lines: list, line: int, problem: str) -> None:
    conf = write(tmp_path / "c", "-r gw", *lines)
    with pytest.raises(UsageError) as caught:
        parse([f"@{conf}"])
    assert str(caught.value).startswith(f"{conf}:{line}: {problem}")


def test_a_mistake_on_the_command_line_is_not_put_on_the_file(tmp_path: Path) -> None:
    conf = write(tmp_path / "c", "-r gw", "10.0.0.0/8")
    with pytest.raises(UsageError) as caught:
        parse([f"@{conf}", "--method=foo"])
    assert str(caught.value).startswith("invalid --method 'foo'")


def test_a_mistake_in_the_variable_names_the_variable() -> None:
    with pytest.raises(UsageError, match=f"^{ENVIRONMENT}: invalid --method 'x'"):
        parse(["-r", "h", "10.0.0.0/8"], {ENVIRONMENT: "--method=x"})
    with pytest.raises(UsageError, match=f"^{ENVIRONMENT}: No closing quotation"):
        parse(["-r", "h", "10.0.0.0/8"], {ENVIRONMENT: "-e 'ssh"})
    with pytest.raises(UsageError, match=f"^{ENVIRONMENT}: -x needs a value"):
        parse(["10.0.0.0/8"], {ENVIRONMENT: "-r h -x"})


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"^cannot read {tmp_path}/none: No such file"):
        parse([f"@{tmp_path}/none"])
    with pytest.raises(UsageError, match="Is a directory"):
        parse([f"@{tmp_path}"])
    binary = tmp_path / "binary"
    binary.write_bytes(b"-r gw\n\xff\xfe\n")
    with pytest.raises(UsageError, match="not UTF-8 text"):
        parse([f"@{binary}"])
    outer = write(tmp_path / "outer", "-r gw", "@missing")
    with pytest.raises(UsageError, match=f"^{outer}:2: cannot read {tmp_path}/missing: "):
        parse([f"@{outer}"])


def test_a_file_without_read_permission() -> None:
    """As a user who may not read it: root may read any file, so as root, as nobody."""
    directory = Path(tempfile.mkdtemp(prefix="shuttle-argfiles-", dir="/tmp"))
    try:
        directory.chmod(0o755)
        conf = write(directory / "c", "-r gw", "10.0.0.0/8")
        conf.chmod(0o600 if os.geteuid() == 0 else 0)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        program = str(Path(sys.executable).parent / "shuttle-client")
        done = subprocess.run(
            [*(nobody if os.geteuid() == 0 else []), program, f"@{conf}"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr == f"shuttle-client: error: cannot read {conf}: Permission denied\n"
    finally:
        shutil.rmtree(directory)


def test_a_lone_at_or_dash_is_a_subnet_and_double_dash_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="invalid subnet '@'"):
        parse(["-r", "h", "@"])
    with pytest.raises(UsageError, match="in subnet '-'"):
        parse(["-r", "h", "-"])
    with pytest.raises(UsageError, match=r"^'--' is no argument"):
        parse(["-r", "h", "--", "10.0.0.0/8"])


def test_every_repeatable_option_of_the_usage_is_known() -> None:
    repeatable = {spec.key for spec in SPECS.values() if spec.repeatable}
    assert repeatable == {"--exclude", "--exclude-from", "--subnets", "--verbose"}  # -vv counts
    assert SPECS["-x"] is SPECS["--exclude"]
    assert SPECS["--method"].takes_value and not SPECS["--dns"].takes_value


def run_client(args: Sequence[str], env: Dict[str, str]) -> "subprocess.CompletedProcess[str]":
    code = "import sys; from shuttle_client.main import main; main(sys.argv[1:])"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_program_says_it_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    conf = write(tmp_path / "work.conf", "-r gw", "--method foo", "10.0.0.0/8")
    result = run_client([f"@{conf}"], {ENVIRONMENT: ""})
    assert result.returncode == 2
    assert result.stderr == (
        f"shuttle-client: error: {conf}:2: invalid --method 'foo': choose auto, nft, nat, tproxy\n"
    )
    # A forgotten -r is a usage error too: systemd's unit does not retry it.
    no_remote = write(tmp_path / "no-remote.conf", "10.0.0.0/8")
    result = run_client([f"@{no_remote}"], {ENVIRONMENT: ""})
    assert (result.returncode, len(result.stderr.splitlines())) == (2, 1)
    assert result.stderr.startswith("shuttle-client: error: no -r HOST")
    result = run_client(["-r", "gw", "10.0.0.0/8"], {ENVIRONMENT: "@/nonexistent/c.conf"})
    assert result.returncode == 2
    assert result.stderr == (
        f"shuttle-client: error: {ENVIRONMENT}: cannot read /nonexistent/c.conf: "
        "No such file or directory\n"
    )

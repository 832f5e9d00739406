"""systemd/shuttle-client@.service: systemd's own check of it as a user unit, and the
directives that matter (a notify service in the foreground, its @file, stop and restart)."""

from __future__ import annotations

import configparser
import importlib.metadata
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from shuttle_client.main import EXIT_USAGE

ROOT = Path(__file__).parents[2]
UNIT = ROOT / "systemd" / "shuttle-client@.service"
CLIENT = str(Path(sys.executable).with_name("shuttle-client"))


def section(name: str) -> configparser.SectionProxy:
    """One section of the unit (each directive appears once in it)."""
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep the case
    parser.read_string(UNIT.read_text())
    return parser[name]


def test_systemd_finds_nothing_wrong(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing (make dev puts systemd there)"
    # An instance of the template, with the command that is installed here (verify checks
    # that it exists); a user manager wants a runtime directory.
    unit = tmp_path / "shuttle-client@work.service"
    exec_start = shlex.split(section("Service")["ExecStart"])[0]
    unit.write_text(UNIT.read_text().replace(exec_start, CLIENT))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    done = subprocess.run(
        [analyze, "--user", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"XDG_RUNTIME_DIR": str(runtime), "PATH": "/usr/bin:/bin"},
    )
    assert (done.returncode, done.stderr) == (0, "")


def test_a_notify_service_in_the_foreground_with_one_config_file() -> None:
    unit = section("Service")
    assert (unit["Type"], unit["NotifyAccess"]) == ("notify", "main")
    command = shlex.split(unit["ExecStart"])
    [script] = importlib.metadata.entry_points(group="console_scripts", name=Path(command[0]).name)
    assert script.value == "shuttle_client.main:main"
    # Each instance its own control socket, then the config file (so no -D).
    assert command[1:] == ["--control=%t/shuttle/%i.sock", "@%h/.config/shuttle/%i.conf"]
    assert "User" not in unit  # a user unit runs as its user


def test_stop_and_restart() -> None:
    unit = section("Service")
    # SIGTERM to the client only: it stops its ssh sessions after its rules are gone.
    assert (unit["KillMode"], unit["KillSignal"]) == ("mixed", "SIGTERM")
    assert 10 <= int(unit["TimeoutStopSec"]) <= 90
    assert unit["Restart"] == "on-failure"
    assert 1 <= int(unit["RestartSec"]) <= 60
    assert unit["RestartPreventExitStatus"].split() == [str(EXIT_USAGE)]
    assert section("Install")["WantedBy"] == "default.target"

"""shuttle-client ctl: its command line, its tables and JSON, the rates of `watch`, its exit
statuses and messages; and the commands against the client's real ControlServer."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
from docopt import DocoptExit
from shuttle_client import ctl
from shuttle_client.ctl import (
    Command,
    Sample,
    UsageError,
    event_lines,
    format_connections,
    format_event,
    format_hosts,
    format_routes,
    format_status,
    format_watch,
    human_bytes,
    human_duration,
    human_rate,
    parse_args,
    rate_connections,
    total_rates,
    watch_json,
)
from shuttle_client.main import main as client_main
from shuttle_protocol.control_messages import (
    ChannelClosed,
    ChannelOpened,
    Connected,
    Connection,
    ConnectionsAnswer,
    Disconnected,
    FirewallBack,
    FirewallLost,
    Reconnecting,
    StatusAnswer,
)

from .control_server import CONNECTIONS, STATUS, running_server

ALL = ("10.1.0.0/16", 1, 65535)


# -- the command line ------------------------------------------------------------------


@pytest.mark.parametrize("word", ["status", "connections", "routes", "hosts", "stop"])
def test_each_query_word(word: str) -> None:
    command = parse_args(["--control=/run/x.sock", "--json", word])
    assert command == Command(word=word, path="/run/x.sock", json=True, timeout=None)


def test_options_may_follow_the_word() -> None:
    command = parse_args(["status", "--timeout", "0.5", "--control", "/run/x.sock"])
    assert (command.word, command.timeout, command.path, command.json) == (
        "status", 0.5, "/run/x.sock", False
    )  # fmt: skip


def test_add_and_remove_take_subnets_and_excludes() -> None:
    command = parse_args(["add", "-x", "10.1.9.0/24", "10.1.0.0/16", "[fd00::]/64:80-90"])
    assert command.word == "add"
    assert command.subnets == (ALL, ("fd00::/64", 80, 90))
    assert command.excludes == (("10.1.9.0/24", 1, 65535),)
    command = parse_args(["remove", "--exclude=10.1.9.0/24"])
    assert (command.word, command.subnets, command.excludes) == (
        "remove", (), (("10.1.9.0/24", 1, 65535),)
    )  # fmt: skip


@pytest.mark.parametrize("word", ["add", "remove"])
def test_add_or_remove_nothing_is_a_usage_error(word: str) -> None:
    with pytest.raises(UsageError, match=f"{word}: give a SUBNET or -x SUBNET"):
        parse_args([word])


def test_a_bad_subnet_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"invalid subnet '10\.0\.0\.0/33'"):
        parse_args(["add", "10.0.0.0/33"])


def test_watch_and_events_options() -> None:
    command = parse_args(["watch", "--interval=0.5", "--count=3"])
    assert (command.word, command.interval, command.count) == ("watch", 0.5, 3)
    assert parse_args(["watch"]).interval == 1.0
    assert parse_args(["events", "--count", "2", "--timeout=9"]).count == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["watch", "--interval=0"], "invalid --interval '0'"),
        (["watch", "--interval=nan"], "invalid --interval 'nan'"),
        (["watch", "--interval=soon"], "invalid --interval 'soon'"),
        (["watch", "--count=0"], "invalid --count '0'"),
        (["events", "--count=-1"], "invalid --count '-1'"),
        (["status", "--timeout=0"], "invalid --timeout '0'"),
        (["status", "--timeout=99999"], "invalid --timeout '99999'"),
    ],
)
def test_bad_numbers_are_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


@pytest.mark.parametrize(
    "argv",
    [[], ["bogus"], ["status", "routes"], ["status", "10.0.0.0/8"], ["status", "--interval=2"]],
)
def test_bad_syntax_is_docopt_exit(argv: list[str]) -> None:
    with pytest.raises(DocoptExit):
        parse_args(argv)


def test_usage_mistakes_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["add"]) == 2
    assert capsys.readouterr().err == "shuttle-client ctl: error: add: give a SUBNET or -x SUBNET\n"
    assert ctl.main(["bogus"]) == 2
    assert "Usage:" in capsys.readouterr().err


def test_the_client_command_dispatches_ctl(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        client_main(["ctl", "add"])
    assert caught.value.code == 2
    assert capsys.readouterr().err.startswith("shuttle-client ctl: error: add:")


def test_no_client_running_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "control.sock"
    assert ctl.main([f"--control={path}", "status"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"shuttle-client ctl: no shuttle-client is running at {path} (no such socket; "
        "started with another --control?)\n"
    )


# -- formatting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 1024**2, "5.0 MiB"),
        (3 * 1024**4, "3.0 TiB"),
        (2048 * 1024**5, "2048.0 PiB"),
    ],
)
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text


def test_human_rate() -> None:
    assert human_rate(2048.0) == "2.0 KiB/s"
    assert human_rate(None) == "-"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0s"), (59.9, "59s"), (60, "1m00s"), (184, "3m04s"), (7500, "2h05m"),
     (3 * 86400 + 4 * 3600 + 59, "3d04h")],
)  # fmt: skip
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_status_table() -> None:
    assert format_status(STATUS) == (
        "state    up\n"
        "remote   alice@gw.example\n"
        "method   nft\n"
        "pid      4242\n"
        "uptime   1h02m\n"
        "streams  1 of 1 up, 1 reconnect\n"
        "open     2 connections, 1 UDP flow\n"
        "bytes    3.0 KiB up, 5.0 MiB down\n"
        "tcp      through ssh's own forwarding (the agent past the cap)\n"
    )


def test_connections_table() -> None:
    assert format_connections(CONNECTIONS) == (
        "CHANNEL  STREAM  PROTO  SOURCE           DESTINATION         UP     DOWN    AGE\n"
        "      7       0  tcp    127.0.0.1:50000  10.1.0.5:80    1.0 KiB  5.0 MiB  1m05s\n"
        "      9       0  udp    [::1]:50001      [fd00::53]:53  2.0 KiB      0 B     2s\n"
        "2 of 3 open\n"
    )
    assert format_connections(ConnectionsAnswer((), 0)) == "no open connections\n"


def test_routes_and_hosts() -> None:
    text = format_routes([ALL, ("fd00::/64", 443, 443)], [("10.1.9.0/24", 1, 65535)], ["10.1.0.53"])
    assert text == (
        "capture  10.1.0.0/16\ncapture  [fd00::/64]:443\nexclude  10.1.9.0/24\ndns      10.1.0.53\n"
    )
    assert format_routes([], []) == "nothing is captured\n"
    assert format_hosts([("db.internal", "10.1.0.7")]) == (
        "NAME         ADDRESS\ndb.internal  10.1.0.7\n"
    )
    assert format_hosts([]).startswith("no host names")


def test_each_event_has_a_line() -> None:
    lines = [
        format_event(event, 0.0).split("  ", 1)[1]
        for event in (
            Connected(0, "alice@gw"),
            Disconnected(1, "agent closed the connection"),
            Reconnecting(1, 3, 2.5),
            ChannelOpened(7, 0, "tcp", "127.0.0.1:5000", "fd00::5", 80),
            ChannelClosed(7, 0, 1024, 0),
            FirewallLost("shuttle-firewalld dropped the connection"),
            FirewallBack("tproxy", 40213),
        )
    ]
    assert lines == [
        "stream 0 connected to alice@gw",
        "stream 1 disconnected: agent closed the connection",
        "stream 1 reconnecting in 2.5 s (attempt 3)",
        "channel 7 opened: tcp 127.0.0.1:5000 -> [fd00::5]:80 (stream 0)",
        "channel 7 closed: 1.0 KiB up, 0 B down (stream 0)",
        "firewall session lost: shuttle-firewalld dropped the connection",
        "firewall session open again (method tproxy, port 40213)",
    ]


def test_event_lines_note_gaps_and_stop_at_count() -> None:
    pairs = [(1, Connected(0, "gw")), (2, Connected(0, "gw")), (5, ChannelClosed(7, 0, 1, 2))]
    lines = list(event_lines(iter(pairs), as_json=False))
    assert [line.split("  ", 1)[-1] for line in lines] == [
        "stream 0 connected to gw",
        "stream 0 connected to gw",
        "(2 events missed)",
        "channel 7 closed: 1 B up, 2 B down (stream 0)",
    ]
    assert len(list(event_lines(iter(pairs), as_json=False, count=2))) == 2


def test_event_lines_in_json() -> None:
    pairs = [(3, ChannelOpened(7, 0, "udp", "127.0.0.1:5000", "10.1.0.53", 53))]
    assert [json.loads(line) for line in event_lines(pairs, as_json=True)] == [
        {
            "sequence": 3,
            "event": "channel_opened",
            "channel": 7,
            "stream": 0,
            "proto": "udp",
            "source": "127.0.0.1:5000",
            "host": "10.1.0.53",
            "port": 53,
        }
    ]


# -- watch: rates ----------------------------------------------------------------------


def conn(channel: int, up: int, down: int, age: float, source: str = "127.0.0.1:1") -> Connection:
    return (channel, 0, "tcp", source, "10.1.0.5", 80, up, down, age)


def sample(at: float, connections: list[Connection], up: int = 0, down: int = 0) -> Sample:
    status = StatusAnswer(
        "up", "gw", "nft", 1, 100.0, 0, 1, 1, len(connections), 0, up, down, "agent", ()
    )
    return Sample(at, status, ConnectionsAnswer(tuple(connections), len(connections)), at)


def test_rates_since_the_previous_sample_or_since_opened() -> None:
    before = sample(10.0, [conn(1, 100, 1000, 8.0)])
    after = sample(12.0, [conn(1, 300, 1000, 10.0), conn(2, 50, 500, 0.5)])
    rated = {r.connection[0]: (r.up, r.down) for r in rate_connections(before, after)}
    assert rated == {1: (100.0, 0.0), 2: (100.0, 1000.0)}


def test_first_sample_rates_are_since_each_opened() -> None:
    rated = rate_connections(None, sample(0.0, [conn(1, 100, 400, 4.0), conn(2, 9, 9, 0.0)]))
    assert [(r.connection[0], r.up, r.down) for r in rated] == [(1, 25.0, 100.0), (2, 0.0, 0.0)]


def test_a_reused_channel_number_is_another_connection() -> None:
    before = sample(0.0, [conn(1, 5000, 5000, 9.0, source="127.0.0.1:1")])
    after = sample(1.0, [conn(1, 10, 20, 0.5, source="127.0.0.1:2")])
    [rated] = rate_connections(before, after)
    assert (rated.up, rated.down) == (20.0, 40.0)


def test_fastest_first() -> None:
    now = sample(0.0, [conn(1, 1, 1, 1.0), conn(2, 900, 0, 1.0), conn(3, 0, 90, 1.0)])
    assert [r.connection[0] for r in rate_connections(None, now)] == [2, 3, 1]


def test_total_rates_come_from_the_status_totals() -> None:
    before = sample(0.0, [], up=1000, down=2000)
    after = sample(2.0, [], up=3000, down=2000)  # closed connections' bytes count too
    assert total_rates(before, after) == (1000.0, 0.0)
    assert total_rates(None, after) == (30.0, 20.0)  # since start: 100 s of uptime


def test_watch_table_and_its_height() -> None:
    now = sample(0.0, [conn(n, n * 1000, 0, 10.0) for n in range(1, 6)], up=15000, down=0)
    lines = format_watch(None, now, 1.0)
    assert (
        lines[0].split("  ", 1)[1] == "shuttle-client pid 1: up, gw (nft), 5 connections, every 1 s"
    )
    assert lines[1].split() == [
        "CHANNEL", "STREAM", "PROTO", "SOURCE", "DESTINATION", "UP", "DOWN", "UP/S", "DOWN/S",
        "AGE",
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[2:]] == ["5", "4", "3", "2", "1", "total"]
    assert lines[-1].split() == [
        "total",
        "14.6",
        "KiB",
        "0",
        "B",
        "150",
        "B/s",
        "0",
        "B/s",
        "1m40s",
    ]
    short = format_watch(None, now, 1.0, height=6)
    assert len(short) == 6
    assert [line.split()[0] for line in short[2:]] == ["5", "4", "(+3)", "total"]


def test_watch_json() -> None:
    data = watch_json(None, sample(0.0, [conn(1, 100, 400, 4.0)], up=100, down=400))
    assert data["connections"] == [
        {
            "channel": 1, "stream": 0, "proto": "tcp", "source": "127.0.0.1:1",
            "host": "10.1.0.5", "port": 80, "bytes_up": 100, "bytes_down": 400,
            "seconds": 4.0, "rate_up": 25.0, "rate_down": 100.0,
        }
    ]  # fmt: skip
    assert (data["total"], data["rate_up"], data["rate_down"]) == (1, 1.0, 4.0)
    assert data["status"]["pid"] == 1


# -- against the client's control server -----------------------------------------------


def run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    return ctl.main(argv, out=out), out.getvalue()


def test_status_and_connections_print_tables() -> None:
    with running_server() as server:
        assert run([f"--control={server.path}", "status"]) == (0, format_status(STATUS))
        assert run([f"--control={server.path}", "connections"]) == (
            0,
            format_connections(CONNECTIONS),
        )


def test_json_output() -> None:
    with running_server() as server:
        code, out = run([f"--control={server.path}", "--json", "status"])
        assert code == 0
        assert json.loads(out)["bytes_down"] == STATUS.bytes_down
        code, out = run([f"--control={server.path}", "connections", "--json"])
        data = json.loads(out)
        assert data["total"] == 3
        assert data["connections"][1]["host"] == "fd00::53"
        code, out = run([f"--control={server.path}", "--json", "routes"])
        assert json.loads(out) == {"subnets": ["10.1.0.0/16"], "excludes": [], "dns": ["10.1.0.53"]}
        code, out = run([f"--control={server.path}", "--json", "hosts"])
        assert json.loads(out) == [{"name": "db.internal", "address": "10.1.0.7"}]


def test_add_then_remove_print_what_is_captured_now() -> None:
    with running_server() as server:
        code, out = run([f"--control={server.path}", "add", "-x", "10.1.9.0/24", "10.2.0.0/16"])
        assert (code, out) == (
            0,
            "capture  10.1.0.0/16\ncapture  10.2.0.0/16\nexclude  10.1.9.0/24\n",
        )
        code, out = run([f"--control={server.path}", "--json", "remove", "10.1.0.0/16"])
        assert code == 0
        assert json.loads(out) == {
            "subnets": ["10.2.0.0/16"],
            "excludes": ["10.1.9.0/24"],
            "dns": [],
        }


def test_a_refusal_exits_1_with_the_clients_text(capsys: pytest.CaptureFixture[str]) -> None:
    with running_server() as server:
        assert run([f"--control={server.path}", "remove", "10.9.0.0/16"]) == (1, "")
    assert capsys.readouterr().err == (
        "shuttle-client ctl: the client said: not captured: 10.9.0.0/16\n"
    )


def test_stop() -> None:
    with running_server() as server:
        assert run([f"--control={server.path}", "stop"]) == (0, "the client is stopping\n")
        assert server.table.stops == 1


def test_watch_prints_successive_tables_when_not_a_terminal() -> None:
    with running_server() as server:
        code, out = run([f"--control={server.path}", "watch", "--interval=0.1", "--count=2"])
    assert code == 0
    tables = out.split("\n\n")
    assert tables[2:] == [""]  # two tables, each ending in a blank line
    for table in tables[:2]:
        lines = table.splitlines()
        assert "  shuttle-client pid 4242: up, alice@gw.example (nft)" in lines[0]
        assert [line.split()[0] for line in lines[1:]] == ["CHANNEL", "7", "9", "total"]
    assert "every 0.1 s" in tables[0] and "every" not in tables[1]


def test_watch_redraws_in_place_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.setenv("LINES", "30")
    out = Terminal()
    with running_server() as server:
        assert (
            ctl.main([f"--control={server.path}", "watch", "--interval=0.1", "--count=2"], out) == 0
        )
    text = out.getvalue()
    assert text.startswith(ctl.HIDE_CURSOR + ctl.HOME)
    assert text.endswith(ctl.CLEAR_BELOW + ctl.SHOW_CURSOR)
    assert text.count(ctl.HOME) == 2
    frame = text.split(ctl.HOME)[1]
    assert all(len(line) <= 60 + len(ctl.CLEAR_LINE) for line in frame.splitlines())


def test_watch_json_lines() -> None:
    with running_server() as server:
        code, out = run(
            [f"--control={server.path}", "--json", "watch", "--interval=0.1", "--count=2"]
        )
    assert code == 0
    frames = [json.loads(line) for line in out.splitlines()]
    assert len(frames) == 2
    assert [c["channel"] for c in frames[1]["connections"]] == [7, 9]


def test_events_print_as_they_come() -> None:
    with running_server() as server:
        out = io.StringIO()
        # When the subscription reaches the server is not knowable: publish until it has.
        done = threading.Event()

        def publish_until_done() -> None:
            while not done.wait(0.02):
                server.publish(Disconnected(0, "test"))

        publisher = threading.Thread(target=publish_until_done)
        publisher.start()
        try:
            argv = [f"--control={server.path}", "--json", "events", "--count=2", "--timeout=5"]
            code = ctl.main(argv, out)
        finally:
            done.set()
            publisher.join(5)
    assert code == 0
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["disconnected", "disconnected"]
    assert events[1]["sequence"] == events[0]["sequence"] + 1


def test_events_timeout_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with running_server() as server:
        assert run([f"--control={server.path}", "events", "--timeout=0.1"]) == (1, "")
    assert capsys.readouterr().err.startswith("shuttle-client ctl: no event from the client")

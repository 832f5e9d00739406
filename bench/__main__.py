"""`make bench`: shuttle beside ssh -L and sshuttle on the test network, in one table.

Run as root from the repository root (`make bench` does, then runs bench.rules):

    .venv/bin/python -m bench [--quick] [--only=CASES] [--systems=SYSTEMS] [--repeat=N]
                              [--json=PATH] [--cipher=NAME] [--method=METHOD]
                              [--delay-ms=MS] [--streams=N] [--sshuttle=REQUIREMENT]

It builds the integration tests' namespace network (testbed), starts its own echo server on
the target, and measures shuttle-client, ssh -L (the same sshd, the same cipher) and sshuttle
(from PyPI, in a venv of its own; nat method), taking turns. `--systems=ssh-L-redirect`,
asked for by name only, adds ssh -L reached at the target's address through an nft redirect
(what a firewalld shortcut to a forward of ssh's own would give at best). The cases:

  bulk   iperf3 throughput each way (10 s)
  rtt    round trips of small echoes, idle and while an iperf3 upload runs
  conns  1,000 and 10,000 simultaneous connections, each echoing once (within 30 s)
  rate   sequential connect-echo-close, for 5 s
  start  start to the first tunnelled echo, and SIGTERM to exit with the rules gone, without
         and with an exclude file of 10,000 /32s (medians of up to 3 starts in 30 s)
  rss    the client's resident memory after start and with 10,000 idle connections
  relay  bulk each way (iperf3, 5 s) with the ssh connection through a relay that delays it
         20 ms each way: over 1 and over 4 connections, shuttle with --streams 1 and 4

--quick runs each for a moment, with smaller counts: a smoke run. The table (stdout; progress
goes to stderr) gives the figures, shuttle's ratios to ssh -L and to sshuttle, and the targets
with whether shuttle meets them; --json also writes it with every raw figure and the
machine's description. Every wait is bounded; all traffic stays inside the namespaces. It
reports and asserts nothing: the exit status is non-zero only if the bench could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.compare import compare
from bench.report import machine, render, rows
from bench.settings import CASES, CIPHER, EXTRA_SYSTEMS, FULL, QUICK, SSHUTTLE, SYSTEMS, Settings
from testbed.procs import CommandError

NEEDED_FDS = 10_000 + 1_000  # the biggest count of connections, and some room


def names(text: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    chosen = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in chosen if name not in allowed]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (comma-separated)")
    return chosen


def parse() -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short durations, smaller counts")
    parser.add_argument(
        "--only", type=lambda text: names(text, CASES), default=CASES, help=",".join(CASES)
    )
    parser.add_argument(
        "--systems",
        type=lambda text: names(text, SYSTEMS + EXTRA_SYSTEMS),
        default=SYSTEMS,
        help=",".join(SYSTEMS + EXTRA_SYSTEMS),
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (median)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write it all as JSON")
    parser.add_argument("--cipher", default=CIPHER, help=f"for all three [{CIPHER}]")
    parser.add_argument("--method", default="nft", choices=["auto", "nft", "nat", "tproxy"])
    parser.add_argument("--delay-ms", type=float, default=20, help="the relay's, each way")
    parser.add_argument("--streams", type=int, default=4, help="shuttle's, through the relay")
    parser.add_argument("--sshuttle", default=SSHUTTLE, help=f"what pip installs [{SSHUTTLE}]")
    args = parser.parse_args()
    if not 1 <= args.repeat <= 10 or not 0 <= args.delay_ms <= 500 or not 2 <= args.streams <= 16:
        parser.error("--repeat must be in [1, 10], --delay-ms in [0, 500], --streams in [2, 16]")
    if args.json is not None:  # now, rather than after minutes of measuring
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"--json: {exc}")
    settings = Settings(
        systems=args.systems,
        cases=args.only,
        sizes=QUICK if args.quick else FULL,
        repeat=args.repeat,
        cipher=args.cipher,
        method=args.method,
        sshuttle=args.sshuttle,
        delay_ms=args.delay_ms,
        streams=args.streams,
    )
    return settings, args.json


def raise_fd_limit() -> None:
    """Everything the bench starts inherits this: load tool, tunnels, sshd and its sessions."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < NEEDED_FDS:
        print(f"bench: the fd limit is {hard}; the big counts will fail", file=sys.stderr)


def main() -> int:
    settings, json_path = parse()
    if os.geteuid() != 0:
        print("bench: must run as root (namespaces, sshd, firewall rules)", file=sys.stderr)
        return 2
    raise_fd_limit()
    began = time.monotonic()
    try:
        outcome = compare(settings)
    except (RuntimeError, CommandError, OSError) as exc:  # no network, no venv: no figures
        print(f"bench: could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    described = machine(settings, outcome.versions)
    table, notes = rows(outcome.figures, settings)
    quick = " (--quick)" if settings.sizes is QUICK else ""
    print(f"\nshuttle beside ssh -L and sshuttle{quick}, {time.monotonic() - began:.0f} s")
    print("; ".join(f"{key}: {value}" for key, value in described.items()))
    print(render(table, notes))
    for problem in outcome.problems:
        print(f"note: {problem}")
    if json_path is not None:
        document = {
            "machine": described,
            "settings": asdict(settings),
            "figures": outcome.figures,
            "details": outcome.details,
            "table": table,
            "notes": notes,
            "problems": outcome.problems,
        }
        json_path.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

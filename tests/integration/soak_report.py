"""The soak's samples as docs/soak.md shows them: a table (one row per --every seconds) and
an ASCII plot per series. Usage: python -m tests.integration.soak_report FILE.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from typing import Dict, List, Optional, Sequence

SERIES = (
    ("client_rss_kib", "client RSS, MiB", 1024),
    ("agent_rss_kib", "agent RSS, MiB", 1024),
    ("client_fds", "client fds", 1),
    ("agent_fds", "agent fds", 1),
)


def read(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as source:
        return list(csv.DictReader(source))


def table(rows: Sequence[Dict[str, str]], every: float) -> List[str]:
    """One line per every seconds of the load (and the baseline and the last sample)."""
    head = ["t s", "phase", "conns", "bulk MiB", *(title for _, title, _ in SERIES)]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    next_t = 0.0
    for index, row in enumerate(rows):
        t = float(row["t"])
        if row["phase"] == "load" and t < next_t and index != len(rows) - 1:
            continue
        next_t = t + every if row["phase"] == "load" else next_t
        cells = [f"{t:.0f}", row["phase"], row["connections"]]
        cells.append(f"{int(row['bulk_bytes']) / 2**20:.0f}")
        for key, _, scale in SERIES:
            value = int(row[key]) / scale
            cells.append(f"{value:.1f}" if scale > 1 else f"{value:.0f}")
        lines.append(" | ".join(cells))
    return lines


def plot(values: Sequence[float], title: str, width: int = 60, height: int = 6) -> List[str]:
    """values over time, width columns (each the largest value of its share), height rows."""
    if not values:
        return [f"{title}: no samples"]
    columns = []
    for column in range(min(width, len(values))):
        start = column * len(values) // min(width, len(values))
        end = (column + 1) * len(values) // min(width, len(values))
        columns.append(max(values[start:end]))
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    lines = [f"{title} (from {low:.1f} to {high:.1f})"]
    for level in range(height, 0, -1):
        edge = low + span * (level - 0.5) / height
        mark = "".join("#" if value >= edge else " " for value in columns)
        label = low + span * level / height
        lines.append(f"{label:8.1f} |{mark}")
    lines.append(f"{'':8} +{'-' * len(columns)}")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="soak_report", description=__doc__.split("\n")[0])
    parser.add_argument("csv", help="the soak's samples (SHUTTLE_SOAK_OUT)")
    parser.add_argument("--every", type=float, default=60, help="seconds per table row")
    args = parser.parse_args(argv)
    rows = read(args.csv)
    print("\n".join(table(rows, args.every)))
    during = [row for row in rows if row["phase"] != "after"]
    for key, title, scale in SERIES:
        print()
        print("\n".join(plot([int(row[key]) / scale for row in during], title)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

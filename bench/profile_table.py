#!/usr/bin/env python3
"""profile_table.py - one forward's kernels, ours beside the peer's, from the
ncu CSV files that `scripts/device-check.sh profile` writes.

Each file holds `ncu --csv --metrics ...` rows (one per kernel launch and
metric) after the program's own output. The table lists the first forward's
launches of each file in launch order: name, time (us), DRAM throughput
(% of peak) and grid size, then the file's total, so that where the time
goes can be read without opening the CSV:

    python3 bench/profile_table.py out/profile-ours-qwen3-30b-a3b-64.csv \\
        out/profile-peer-qwen3-30b-a3b-64.csv

A forward is the launches up to the first repeat of the first launch's
kernel name: one launch of each kernel, in the order of a forward that
starts wherever ncu's capture window did (the profile step captures 12
launches, about two forwards).
"""
import argparse
import csv
import io
import sys

TIME = "gpu__time_duration.sum"
DRAM = "dram__throughput.avg.pct_of_peak_sustained_elapsed"
GRID = "launch__grid_size"


def number(text):
    """ncu's numbers carry thousands separators: '24,512' -> 24512.0."""
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return float("nan")


def launches(path):
    """[(kernel name, {metric: value})] in launch order."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    rows = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        entry = rows.setdefault(row["ID"], (row["Kernel Name"], {}))
        entry[1][row["Metric Name"]] = number(row["Metric Value"])
    return [rows[key] for key in sorted(rows, key=int)]


def first_forward(runs):
    """The launches before the first kernel's name comes round again."""
    if not runs:
        return []
    for i in range(1, len(runs)):
        if runs[i][0] == runs[0][0]:
            return runs[:i]
    return runs


def short(name, width):
    """The kernel's name without its parameter list, cut to width."""
    base = name.split("(")[0].replace("void ", "")
    return base if len(base) <= width else base[: width - 1] + "~"


def table(path, width=48):
    runs = first_forward(launches(path))
    out = [f"## {path}", "", "| kernel | us | DRAM % of peak | grid |", "|---|---:|---:|---:|"]
    total = 0.0
    for name, metrics in runs:
        us = metrics.get(TIME, float("nan")) / 1000.0  # ncu reports ns
        total += us if us == us else 0.0
        out.append(f"| {short(name, width)} | {us:.1f} | {metrics.get(DRAM, float('nan')):.1f} | "
                   f"{metrics.get(GRID, float('nan')):.0f} |")
    out.append(f"| total ({len(runs)} launches) | {total:.1f} | | |")
    return "\n".join(out)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="ncu CSV files of the profile step")
    args = parser.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            print(table(path))
        except OSError as err:
            print(f"profile_table.py: {err}", file=sys.stderr)
            status = 1
        print()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

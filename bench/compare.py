#!/usr/bin/env python3
"""compare.py - per-point comparison of two moe_bench-style JSON files.

    python3 bench/compare.py OURS.json PEER.json [--labels ours,peer]
    python3 bench/compare.py A1.json,A2.json B1.json,B2.json --labels a,b

Prints, for each (model, tokens) present in both, both median times and the
ratio (second / first: above 1 means the first is faster), then the geomean
of the ratios, the minimum ratio and the number of points the first wins or
ties. Used for our layer against bench/triton_peer.py's JSON of the same
run (issue floors), and for A/B runs of our own (two moe_bench files).
A side may be several files (comma-separated): repeated runs of the same
variant, interleaved with the other side's on a noisy machine; a point's
time is then the median of the runs' medians, and the ratio's range over
the runs paired in order is printed too.
Points where the two sides' routing touched different experts (different
router logits: bench/triton_peer.py drew its own before 2026-12-05) are
listed after the table, as their times then cover different weight bytes.
Last, the ceiling: the geomean of the second side's time over the first
side's roofline (max(bytes / read bandwidth, flops / dense peak), both
measured by moe_bench in that run), which is the most the first side could
reach against the second if every point ran at its roofline.
"""
import argparse
import json
import math
import sys


def rows(path):
    with open(path) as f:
        data = json.load(f)
    return data, {(r["model"], int(r["tokens"])): r for r in data["rows"]}


def runs(paths):
    """The first file's JSON and, per point, the rows of every file."""
    loaded = [rows(p) for p in paths.split(",")]
    points = {}
    for _, by_point in loaded:
        for p, r in by_point.items():
            points.setdefault(p, []).append(r)
    return loaded[0][0], {p: rs for p, rs in points.items() if len(rs) == len(loaded)}


def median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("first")
    ap.add_argument("second")
    ap.add_argument("--labels", default="ours,peer")
    args = ap.parse_args()
    a_label, b_label = args.labels.split(",")
    a_data, a = runs(args.first)
    b_data, b = runs(args.second)
    repeated = any(len(rs) > 1 for rs in list(a.values()) + list(b.values()))
    for label, data in ((a_label, a_data), (b_label, b_data)):
        print(f"{label}: {data.get('device', '?')}, {data.get('date', '?')}")
    points = [p for p in a if p in b]
    if not points:
        sys.exit("no common (model, tokens) points")
    spread = " | paired runs" if repeated else ""
    print(f"| model | tokens | {a_label} us | {b_label} us | {b_label}/{a_label} | {a_label} % read BW{spread} |")
    print("|---|---:|---:|---:|---:|---:|" + ("---|" if repeated else ""))
    ratios, unlike, ceilings = [], [], []
    for p in points:
        touched = (a[p][0].get("experts_touched"), b[p][0].get("experts_touched"))
        if None not in touched and touched[0] != touched[1]:
            unlike.append(f"{p[0]} {p[1]}: {touched[0]} against {touched[1]}")
        ta = median([r["median_us"] for r in a[p]])
        tb = median([r["median_us"] for r in b[p]])
        ratio = tb / ta
        ratios.append(ratio)
        if a[p][0].get("roofline_us"):
            ceilings.append(tb / a[p][0]["roofline_us"])
        bw = 100.0 * a[p][0].get("of_read_bw", 0.0)
        line = f"| {p[0]} | {p[1]} | {ta:.1f} | {tb:.1f} | {ratio:.3f} | {bw:.1f} |"
        if repeated:
            paired = [rb["median_us"] / ra["median_us"] for ra, rb in zip(a[p], b[p])]
            line += f" {min(paired):.3f}-{max(paired):.3f} |"
        print(line)
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    wins = sum(1 for r in ratios if r >= 1.0)
    print(f"\npoints {len(ratios)}, {a_label} at least as fast at {wins}; "
          f"geomean {b_label}/{a_label} {geomean:.3f}; min {min(ratios):.3f}")
    if len(ceilings) == len(ratios):
        ceiling = math.exp(sum(math.log(c) for c in ceilings) / len(ceilings))
        print(f"ceiling: {a_label} at 100% of its roofline everywhere would reach geomean "
              f"{b_label}/{a_label} {ceiling:.3f}")
    if unlike:
        print(f"experts touched differ ({a_label} against {b_label}; other router logits): "
              + "; ".join(unlike))


if __name__ == "__main__":
    main()

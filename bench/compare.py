#!/usr/bin/env python3
"""compare.py - per-point comparison of two moe_bench-style JSON files.

    python3 bench/compare.py OURS.json PEER.json [--labels ours,peer]

Prints, for each (model, tokens) present in both, both median times and the
ratio (second / first: above 1 means the first is faster), then the geomean
of the ratios, the minimum ratio and the number of points the first wins or
ties. Used for our layer against bench/triton_peer.py's JSON of the same
run (issue floors), and for A/B runs of our own (two moe_bench files).
"""
import argparse
import json
import math
import sys


def rows(path):
    with open(path) as f:
        data = json.load(f)
    return data, {(r["model"], int(r["tokens"])): r for r in data["rows"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("first")
    ap.add_argument("second")
    ap.add_argument("--labels", default="ours,peer")
    args = ap.parse_args()
    a_label, b_label = args.labels.split(",")
    a_data, a = rows(args.first)
    b_data, b = rows(args.second)
    for label, data in ((a_label, a_data), (b_label, b_data)):
        print(f"{label}: {data.get('device', '?')}, {data.get('date', '?')}")
    points = [p for p in a if p in b]
    if not points:
        sys.exit("no common (model, tokens) points")
    print(f"| model | tokens | {a_label} us | {b_label} us | {b_label}/{a_label} | {a_label} % read BW |")
    print("|---|---:|---:|---:|---:|---:|")
    ratios = []
    for p in points:
        ra, rb = a[p], b[p]
        ratio = rb["median_us"] / ra["median_us"]
        ratios.append(ratio)
        bw = 100.0 * ra.get("of_read_bw", 0.0)
        print(f"| {p[0]} | {p[1]} | {ra['median_us']:.1f} | {rb['median_us']:.1f} | {ratio:.3f} | {bw:.1f} |")
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    wins = sum(1 for r in ratios if r >= 1.0)
    print(f"\npoints {len(ratios)}, {a_label} at least as fast at {wins}; "
          f"geomean {b_label}/{a_label} {geomean:.3f}; min {min(ratios):.3f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""plot.py - draws moe_bench results: fraction of the roofline vs tokens.

Reads one or more JSON files written by `moe_bench --json FILE` and draws,
per (model, backend, kernel path, device), the measured time as a percentage
of the roofline time max(bytes/read_bw, flops/peak) against the token count
(log x); peer runs (bench/triton_peer.py, bench/torch_cpu_peer.py) are
drawn dashed in the panels of their backend on the same device. Writes bench/results.png unless -o says otherwise. With --markdown,
prints each run as a markdown table (for bench/results.md) instead.

    python3 bench/plot.py bench/results/*.json
    python3 bench/plot.py --markdown bench/results/h200-cuda.json
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


# Peer runs: their backend field -> (the backend whose panels draw them, name).
PEER_OF = {"triton-peer": ("cuda", "Triton peer"), "torch-cpu-peer": ("cpu", "PyTorch peer")}


def series_of(run):
    """Yields (model, label, tokens, percent) for each model in one run."""
    by_model = {}
    for row in run.get("rows", []):
        if "of_roofline" in row:
            by_model.setdefault(row["model"], []).append(row)
    # The CPU backend's device name repeats the kernel path: "... [avx512] 2 threads".
    device = run.get("device", "?").split(" [")[0]
    for model, rows in by_model.items():
        rows.sort(key=lambda r: r["tokens"])
        label = f"{model} - {run.get('backend', '?')} [{run.get('kernels', '?')}] on {device}"
        yield model, label, [r["tokens"] for r in rows], [100 * r["of_roofline"] for r in rows]


def peer_series(peer, roof):
    """Yields (model, tokens, percent) of a peer run against roof."""
    by_model = {}
    for row in peer.get("rows", []):
        by_model.setdefault(row["model"], []).append(row)
    for model, rows in by_model.items():
        rows.sort(key=lambda r: r["tokens"])
        percent = [100 * max(r["bytes"] / (roof["read_gbps"] * 1e3),
                             r["flops"] / (roof["peak_tflops"] * 1e6)) / r["median_us"]
                   for r in rows]
        yield model, [r["tokens"] for r in rows], percent


def markdown(run):
    """One run as markdown: where and how it ran, the rooflines, the rows."""
    roof = run.get("rooflines")
    lines = [f"- device: {run['device']} ({run['backend']}, kernels {run['kernels']})",
             f"- date: {run['date']}; command: `{run['command']}`",
             f"- timing: {run['timing']}"]
    if roof:
        lines.append(f"- rooflines: read {roof['read_gbps']:.1f} GB/s ({roof['read_what']}); "
                     f"peak {roof['peak_tflops']:.3f} TFLOP/s ({roof['peak_what']})")
    lines += ["", "| model | tokens | experts | median us | TFLOP/s | GB/s | % roofline | % read BW "
              "| % peak | bound |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in run["rows"]:
        pct = (lambda key: f"{100 * r[key]:.1f}" if key in r else "-")
        lines.append(f"| {r['model']} | {r['tokens']} | {r['experts_touched']} | "
                     f"{r['median_us']:.1f} | {r['tflops']:.4f} | {r['gbps']:.1f} | "
                     f"{pct('of_roofline')} | {pct('of_read_bw')} | {pct('of_peak')} | "
                     f"{r.get('bound', '-')} |")
    return "\n".join(lines)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="moe_bench --json outputs")
    parser.add_argument("-o", "--output", default=os.path.join(here, "results.png"))
    parser.add_argument("--title", default="moe_bench: fraction of roofline")
    parser.add_argument("--markdown", action="store_true", help="print tables, draw nothing")
    args = parser.parse_args()

    if args.markdown:
        for path in args.json:
            with open(path) as f:
                print(markdown(json.load(f)) + "\n")
        return

    runs, peers, panel_of = [], [], {}
    for path in args.json:
        with open(path) as f:
            run = json.load(f)
        # The peers (bench/triton_peer.py, bench/torch_cpu_peer.py) have no
        # rooflines of their own: each is drawn dashed in the panels of the
        # runs of its backend on the same device, thread count and day (the
        # same session's machine), against their rooflines.
        if run.get("backend") in PEER_OF:
            peers.append(run)
            continue
        # Runs of one backend, kernel path, device and thread count share a
        # panel (each row keeps the fraction of its own run's rooflines).
        key = (run.get("backend"), run.get("kernels"), run.get("device"), run.get("threads"))
        if key in panel_of:
            panel_of[key]["rows"] = panel_of[key].get("rows", []) + run.get("rows", [])
        else:
            panel_of[key] = run
            runs.append(run)
    # One panel per run (backend, kernels, device), one colour per model in
    # every panel, so models compare within a panel and devices across them.
    cols = 1 if len(runs) == 1 else 2
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), sharey=True,
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    model_color, handles = {}, {}
    drawn = 0
    for ax, run in zip(axes.flat, runs):
        title = None
        for model, label, tokens, percent in series_of(run):
            color = colors[model_color.setdefault(model, len(model_color)) % len(colors)]
            (line,) = ax.plot(tokens, percent, color=color, marker="o", label=model)
            handles.setdefault(model, line)
            title = label.split(" - ", 1)[1]
            drawn += 1
        for peer in peers:
            backend, name = PEER_OF[peer["backend"]]
            if (run.get("backend") != backend or peer.get("device") != run.get("device").split(" [")[0]
                    or (peer.get("threads") or 0) != (run.get("threads") or 0)
                    or peer.get("date", "")[:10] != run.get("date", "")[:10]):
                continue
            for model, tokens, percent in peer_series(peer, run["rooflines"]):
                color = colors[model_color.setdefault(model, len(model_color)) % len(colors)]
                ax.plot(tokens, percent, color=color, marker="x", linestyle="--", linewidth=0.9)
            title = (title or "") + f" (dashed: {name})"
        threads = f", {run['threads']} threads" if run.get("threads") else ""
        ax.set_title((title or run.get("device", "?")) + threads, fontsize="medium")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("tokens per forward")
        ax.axhline(100, color="gray", linewidth=0.8, linestyle="--")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    if not drawn:
        sys.exit("plot.py: no rows with rooflines in " + ", ".join(args.json))
    for ax in axes[:, 0]:
        ax.set_ylabel("% of roofline")
        ax.set_ylim(bottom=0)
    fig.suptitle(f"{args.title}  (roofline = max(bytes / read BW, flops / peak), "
                 "measured in the same run)")
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles),
               fontsize="small")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(args.output, dpi=110)
    print(f"plot.py: wrote {args.output} ({drawn} series in {len(runs)} panels)")

if __name__ == "__main__":
    main()

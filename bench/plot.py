#!/usr/bin/env python3
"""Render PNG plots of one bench results file (bench/results/*.jsonl).

    .venv/bin/python bench/plot.py                      # newest results file
    .venv/bin/python bench/plot.py bench/results/X.jsonl --outdir bench/results

Writes next to the results (or to --outdir):
  <stem>-throughput.png   requests/s per strategy, one panel per scenario/view
                          (median over repetitions; error bars = min..max;
                          a red x marks runs with errors)
  <stem>-s4-connections.png  server connections over time during the S4 reload
                          storm, one line per strategy, with the budget line
  <stem>-connections.png  peak and mean server connections per scenario and strategy
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
STRATEGIES = ["direct", "persistent", "djdbpool", "pgbouncer", "pgbouncer-session", "sharedpool",
              "sharedpool-nofollow"]
COLORS = {"direct": "#8c8c8c", "persistent": "#1f77b4", "djdbpool": "#9467bd",
          "pgbouncer": "#ff7f0e", "pgbouncer-session": "#ffbb78",
          "sharedpool": "#2ca02c", "sharedpool-nofollow": "#98df8a"}


def newest_results() -> str:
    files = sorted(glob.glob(os.path.join(RESULTS_DIR, "*.jsonl")), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"no results in {RESULTS_DIR}; run bench/run.py first")
    return files[-1]


def load(path: str) -> list[dict]:
    runs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rec = json.loads(line)
                if rec.get("kind", "run") == "run":
                    runs.append(rec)
    if not runs:
        raise SystemExit(f"{path}: no runs")
    return runs


def group(runs):
    by: dict[tuple, dict[str, list[dict]]] = {}
    for r in runs:
        by.setdefault((r["scenario"], r["view"]), {}).setdefault(r["strategy"], []).append(r)
    return dict(sorted(by.items()))


def plot_throughput(runs, out, title):
    import matplotlib.pyplot as plt
    panels = group(runs)
    n = len(panels)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, ((sc, view), strats) in zip(axes.flat, panels.items()):
        names = [s for s in STRATEGIES if s in strats]
        med = [statistics.median(r["rps"] for r in strats[s]) for s in names]
        lo = [m - min(r["rps"] for r in strats[s]) for m, s in zip(med, names)]
        hi = [max(r["rps"] for r in strats[s]) - m for m, s in zip(med, names)]
        bars = ax.bar(names, med, color=[COLORS[s] for s in names],
                      yerr=[lo, hi] if any(len(strats[s]) > 1 for s in names) else None,
                      capsize=3)
        for b, s, m in zip(bars, names, med):
            peak = max(r["conn_peak"] for r in strats[s])
            errs = sum(r["errors"] for r in strats[s])
            ax.annotate(f"{m:.0f}\npeak {peak}", (b.get_x() + b.get_width() / 2, m),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")
            if errs:
                ax.plot(b.get_x() + b.get_width() / 2, m * 0.5, "x", color="red",
                        markersize=8, mew=2)
        budget = strats[names[0]][0]["budget"]
        ax.set_title(f"{sc} {view} (budget {budget})", fontsize=10)
        ax.set_ylabel("requests/s")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set_ylim(0, max(med) * 1.3 if med and max(med) > 0 else 1)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"Throughput per scenario ({title}); red x: the runs had errors", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_s4(runs, out, title):
    import matplotlib.pyplot as plt
    s4 = [r for r in runs if r["scenario"] == "S4"]
    if not s4:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.2))
    budget = s4[0]["budget"]
    seen = set()
    for r in sorted(s4, key=lambda r: (STRATEGIES.index(r["strategy"])
                                       if r["strategy"] in STRATEGIES else 99, r["repeat"])):
        s = r["strategy"]
        if s in seen:  # first repetition only: one line per strategy
            continue
        seen.add(s)
        t0 = r["load_window_s"][0]
        xs = [t - t0 for t, _ in r["series"]]
        ys = [n for _, n in r["series"]]
        ax.step(xs, ys, where="post", color=COLORS.get(s), lw=1.2,
                label=f"{s} (peak {r['conn_peak']}, mean {r['conn_mean']:.1f})")
    ax.axhline(budget, color="red", ls="--", lw=1.2, label=f"budget {budget}")
    dur = s4[0]["load_window_s"][1] - s4[0]["load_window_s"][0]
    ax.axvspan(0, dur, color="0.93", zorder=0)
    ax.set_xlabel("seconds since load start (grey: load; HUP every "
                  f"{s4[0]['hup_every_s']:g} s, --max-requests {s4[0]['max_requests']})")
    ax.set_ylabel("server connections (pg_stat_activity)")
    ax.set_title(f"S4 reload storm: server connections over time, sampled every 20 ms ({title})",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.set_ylim(0, max(max(n for _, n in r["series"]) for r in s4) * 1.25 + 1)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_connections(runs, out, title):
    import matplotlib.pyplot as plt
    panels = group(runs)
    labels = [f"{sc}\n{view}" for sc, view in panels]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(labels)), 4))
    width = 0.16
    for i, s in enumerate(STRATEGIES):
        xs, peaks, means = [], [], []
        for j, strats in enumerate(panels.values()):
            if s in strats:
                xs.append(j + (i - 2) * width)
                peaks.append(max(r["conn_peak"] for r in strats[s]))
                means.append(statistics.median(r["conn_mean"] for r in strats[s]))
        if xs:
            ax.bar(xs, peaks, width, color=COLORS[s], alpha=0.35)
            ax.bar(xs, means, width, color=COLORS[s], label=s)
    for j, strats in enumerate(panels.values()):
        b = next(iter(strats.values()))[0]["budget"]
        ax.hlines(b, j - 0.45, j + 0.45, colors="red", linestyles="--", lw=1)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("server connections")
    ax.set_title(f"Server connections: mean (solid) and peak (light); red dashes: budget "
                 f"({title})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench/plot.py", description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="?", help="results .jsonl (default: the newest)")
    ap.add_argument("--outdir", help="where to write the PNGs (default: next to the results)")
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    path = args.results or newest_results()
    runs = load(path)
    outdir = args.outdir or os.path.dirname(os.path.abspath(path))
    os.makedirs(outdir, exist_ok=True)
    stem = os.path.join(outdir, os.path.basename(path).rsplit(".jsonl", 1)[0])
    title = os.path.basename(path).rsplit(".jsonl", 1)[0]
    written = [plot_throughput(runs, stem + "-throughput.png", title),
               plot_s4(runs, stem + "-s4-connections.png", title),
               plot_connections(runs, stem + "-connections.png", title)]
    for w in written:
        if w:
            print(f"plot: {os.path.relpath(w)}")
    if not any(r["scenario"] == "S4" for r in runs):
        print("plot: no S4 runs in these results; no connections-over-time plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())

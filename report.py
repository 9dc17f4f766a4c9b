"""Summarise a folder of runs: python report.py runs/ [--plot shots.png]

Reads every results.json below the folder, groups runs by (dataset, method, backbone, shots,
protocol), averages the seeds (mean ± sample standard deviation, and how many seeds), and prints
one markdown table with the papers' numbers beside ours where paper_results.csv has them (each with
its source).
--plot draws accuracy against shots per method, one panel per dataset (needs matplotlib).
"""
import argparse
import csv
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

PAPER = Path(__file__).with_name("paper_results.csv")

def collect(root):
    """{(dataset, method, backbone, shots, protocol, metric): [accuracy of each seed]} of the runs
    below `root`."""
    return collect_files(sorted(Path(root).rglob("results.json")))

def collect_files(paths):
    """collect() of these results.json files (sweep.py's: exactly its experiment's runs)."""
    groups = defaultdict(list)
    for path in paths:
        try:
            result = json.loads(path.read_text())
            key = tuple(result[k] for k in ("dataset", "method", "backbone", "shots", "protocol"))
            accuracy = result["accuracy"]
            hash(key)  # a list where a name belongs is not a key
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       for v in accuracy.values()):
                raise TypeError("an accuracy that is not a number")
        # unreadable, not JSON, odd fields
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            print(f"skipped {path}: not a finished run's results.json ({type(e).__name__}: {e})",
                  file=sys.stderr)
            continue
        for metric, value in accuracy.items():
            groups[key + (metric,)].append(value)
    return groups

def paper_numbers(path=PAPER):
    with open(path, newline="") as f:
        return {(r["dataset"], r["method"], r["backbone"], int(r["shots"]), r["protocol"],
                 r["metric"]): (float(r["value"]), r["source"]) for r in csv.DictReader(f)}

def table(groups, paper):
    lines = ["| dataset | method | backbone | shots | protocol | metric | ours | seeds | paper "
             "| source |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, values in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        value, source = paper.get(key, (None, ""))
        lines.append("| " + " | ".join(map(str, key))
                     + f" | {statistics.mean(values):.2f} ± {std:.2f} | "
                     f"{len(values)} | {'' if value is None else f'{value:.2f}'} | {source} |")
    return "\n".join(lines)

def plot(groups, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib: pip install matplotlib")
    curves = defaultdict(dict)  # (dataset, method, backbone) -> {shots: mean accuracy}
    for (dataset, method, backbone, shots, protocol, metric), values in groups.items():
        if protocol == "fewshot" and metric == "test":
            curves[dataset, method, backbone][shots] = statistics.mean(values)
    datasets = sorted({key[0] for key in curves})
    if not datasets:
        sys.exit("--plot: no few-shot runs to plot")
    fig, axes = plt.subplots(1, len(datasets), figsize=(4 * len(datasets), 3.5),
                             squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        ticks = set()
        for (d, method, backbone), points in sorted(curves.items()):
            if d == dataset:
                shots = sorted(points)
                ax.plot(shots, [points[s] for s in shots], marker="o",
                        label=f"{method} ({backbone})")
                ticks.update(shots)
        ax.set(title=dataset, xlabel="shots per class", ylabel="top-1 accuracy (%)",
               xscale="symlog", xticks=sorted(ticks))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs",
                        help="folder holding runs (searched recursively for results.json)")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw accuracy against shots")
    args = parser.parse_args(argv)
    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        sys.exit(f"--plot {args.plot}: no folder {Path(args.plot).parent} to write it in")
    groups = collect(args.runs)
    if not groups:
        sys.exit(f"no results.json under {args.runs}: run train.py first")
    try:
        # flushed here: a closed pipe raises now, not at exit
        print(table(groups, paper_numbers()), flush=True)
    # `| head`: the reader took what it wanted; as methods.output_closed (no torch here)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if args.plot:
        plot(groups, args.plot)

if __name__ == "__main__":
    main()

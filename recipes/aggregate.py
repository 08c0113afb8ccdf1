"""Mean and std over seeds of several recipe runs.

    python recipes/aggregate.py outputs/mnist_s0 outputs/mnist_s1 --out outputs/mnist_mean

Writes aggregate.json (scenario -> method -> metric -> {mean, std, n}), aggregate.md (every
metric) and gaps.md (Avg. Gap to Retrain, method x scenario).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

METRICS = [
    "ua",
    "ra",
    "ta",
    "mia",
    "loss_attack",
    "avg_gap",
    "seconds",
    "storage_bytes",
    "dist_original",
    "dist_retrain",
    "scale",
    "repair_steps",
]


def aggregate(runs: list[dict]) -> dict:
    out = {}
    for scenario in runs[0]:
        out[scenario] = {}
        for method in runs[0][scenario]:
            out[scenario][method] = {}
            for metric in METRICS:
                values = [r[scenario][method][metric] for r in runs if metric in r[scenario][method]]
                if values:
                    out[scenario][method][metric] = {
                        "mean": float(np.nanmean(values)),
                        "std": float(np.nanstd(values)),
                        "n": len(values),
                    }
    return out


def to_markdown(agg: dict, metrics=("ua", "ra", "ta", "mia", "avg_gap", "seconds", "storage_bytes")) -> str:
    lines = ["| scenario | method | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for scenario, methods in agg.items():
        for method, values in methods.items():
            cells = []
            for m in metrics:
                v = values.get(m)
                if v is None:
                    cells.append("")
                elif m == "storage_bytes":
                    cells.append(f"{v['mean']:,.0f}")
                else:
                    cells.append(f"{v['mean']:.2f} ± {v['std']:.2f}")
            lines.append(f"| {scenario} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_table(agg: dict) -> str:
    """Avg. Gap to Retrain, method x scenario (mean ± std over the runs)."""
    scenarios = [s for s in agg if not s.startswith("sequence")]
    methods = list(dict.fromkeys(m for s in scenarios for m in agg[s]))
    lines = ["| method | " + " | ".join(scenarios) + " |", "|---|" + "---|" * len(scenarios)]
    for method in methods:
        cells = []
        for scenario in scenarios:
            v = agg[scenario].get(method, {}).get("avg_gap")
            cells.append("" if v is None else f"{v['mean']:.2f} ± {v['std']:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="output_dir of each run (holding results.json)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    runs = []
    for folder in args.runs:
        with open(os.path.join(folder, "results.json")) as f:
            runs.append(json.load(f))
    agg = aggregate(runs)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "aggregate.json"), "w") as f:
        json.dump(agg, f, indent=1)
    table = to_markdown(agg)
    with open(os.path.join(args.out, "aggregate.md"), "w") as f:
        f.write(table + "\n")
    gaps = gap_table(agg)
    with open(os.path.join(args.out, "gaps.md"), "w") as f:
        f.write(gaps + "\n")
    print(gaps)


if __name__ == "__main__":
    main()

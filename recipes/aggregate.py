"""Mean and std over seeds of several recipe runs.

    python recipes/aggregate.py outputs/mnist_s0 outputs/mnist_s1 --out outputs/mnist_mean

Writes aggregate.json (scenario -> method -> metric -> {mean, std, n}), aggregate.md (every
metric), gaps.md (Avg. Gap to Retrain, method x scenario) and, from two runs on, counts.md: the
part of the Gap that counts forget rows, (|dUA| + |dMIA|) / 4, beside a reference that has
Retrain's distribution of those counts but not its rows (`count_parts`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file, not with -m: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes.evaluation import GAP_METRICS

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
    """scenario -> method -> metric -> {mean, std, n}; a method missing from some runs is
    aggregated over the runs that have it (`n` says how many)."""
    out = {}
    for scenario in runs[0]:
        out[scenario] = {}
        for method in dict.fromkeys(m for r in runs for m in r.get(scenario, {})):
            out[scenario][method] = {}
            present = [r[scenario][method] for r in runs if method in r.get(scenario, {})]
            for metric in METRICS:
                values = [row[metric] for row in present if metric in row]
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


def _method_by_scenario(table: dict, scenarios: list[str], cell) -> str:
    """A markdown table, a row per method of `table[scenario]`, a column per scenario; `cell`
    formats table[scenario][method] (blank where a scenario lacks the method)."""
    methods = list(dict.fromkeys(m for s in scenarios for m in table[s]))
    lines = ["| method | " + " | ".join(scenarios) + " |", "|---|" + "---|" * len(scenarios)]
    for method in methods:
        cells = [cell(table[s][method]) if method in table[s] else "" for s in scenarios]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_table(agg: dict) -> str:
    """Avg. Gap to Retrain, method x scenario (mean ± std over the runs)."""

    def cell(values: dict) -> str:
        v = values.get("avg_gap")
        return "" if v is None else f"{v['mean']:.2f} ± {v['std']:.2f}"

    return _method_by_scenario(agg, [s for s in agg if not s.startswith("sequence")], cell)


ANOTHER_REQUEST = "retrain (another request)"


def _count_part(method: dict, retrain: dict) -> float:
    """The UA and MIA-efficacy terms of the Avg. Gap (`evaluation.avg_gap`): (|dUA| + |dMIA|) / 4."""
    return sum(abs(method[m] - retrain[m]) for m in ("ua", "mia")) / len(GAP_METRICS)


def count_parts(runs: list[dict]) -> dict:
    """scenario -> method -> {"mean": mean over runs of `_count_part` against the run's Retrain,
    "n": how many runs}.

    UA and MIA-efficacy count forget rows, so on a small request they move by a whole row at a
    time. Retrain with another seed errs largely on the same rows as Retrain; the reference
    `ANOTHER_REQUEST` compares each run's Retrain with the Retrain of every other run (another
    seed, so another request): Retrain's distribution of counts, independent of which rows were
    requested. Needs at least two runs; methods or runs without UA and MIA are left out.
    """
    out = {}
    for scenario in runs[0]:
        with_retrain = [r[scenario] for r in runs if "ua" in r.get(scenario, {}).get("retrain", {})]
        if len(with_retrain) < 2:
            continue
        pairs = [_count_part(a["retrain"], b["retrain"]) for a in with_retrain for b in with_retrain if a is not b]
        out[scenario] = {ANOTHER_REQUEST: {"mean": float(np.mean(pairs)), "n": len(with_retrain)}}
        for method in dict.fromkeys(m for r in with_retrain for m in r):
            parts = [_count_part(r[method], r["retrain"]) for r in with_retrain if "ua" in r.get(method, {})]
            if method != "retrain" and parts:
                out[scenario][method] = {"mean": float(np.mean(parts)), "n": len(parts)}
    return out


def count_table(parts: dict) -> str:
    """(|dUA| + |dMIA|) / 4 to each run's Retrain, method x scenario (mean over the runs). A method
    that only some of a scenario's runs have says over how many runs its mean is."""

    def cells(scenario: str) -> dict:
        runs = parts[scenario][ANOTHER_REQUEST]["n"]
        return {
            method: f"{v['mean']:.2f}" + ("" if v["n"] == runs else f" ({v['n']} of {runs} runs)")
            for method, v in parts[scenario].items()
        }

    return _method_by_scenario({s: cells(s) for s in parts}, list(parts), str)


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
    parts = count_parts(runs)
    if parts:
        with open(os.path.join(args.out, "counts.md"), "w") as f:
            f.write(count_table(parts) + "\n")


if __name__ == "__main__":
    main()

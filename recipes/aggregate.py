"""Mean and std over seeds of several recipe runs.

    python recipes/aggregate.py outputs/mnist_s0 outputs/mnist_s1 --out outputs/mnist_mean

    python recipes/aggregate.py outputs/mnist_s* --out outputs/mnist_mean --reference hf_amnesia_exact

Writes aggregate.json (scenario -> method -> metric -> {mean, std, n}), aggregate.md (every
metric), gaps.md (Avg. Gap to Retrain, method x scenario), gaps_robust.md (the same from
avg_gap_robust, when the runs have it), paired.json and paired.md (`paired_table`: the reference
method's avg_gap_robust minus each baseline's, paired by run, with a bootstrap 95 % interval;
negative = the reference is closer to Retrain) and, from two runs on, counts.md: the part of the
Gap that counts forget rows, (|dUA| + |dMIA|) / 4, beside a reference that has Retrain's
distribution of those counts but not its rows (`count_parts`).
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

from recipes.evaluation import GAP_METRICS, table_columns

METRICS = [
    "ua",
    "ra",
    "ta",
    "mia",
    "mia_auc",
    "loss_attack",
    "avg_gap",
    "avg_gap_robust",
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


def to_markdown(agg: dict, metrics=None) -> str:
    """aggregate's output as one markdown table, mean ± std per cell."""
    rows = [values for methods in agg.values() for values in methods.values()]
    metrics = metrics or table_columns(
        rows, ("ua", "ra", "ta", "mia", "mia_auc", "avg_gap", "avg_gap_robust", "seconds", "storage_bytes")
    )
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


def gap_table(agg: dict, metric: str = "avg_gap") -> str:
    """Avg. Gap to Retrain (or `metric`), method x scenario (mean ± std over the runs)."""

    def cell(values: dict) -> str:
        v = values.get(metric)
        return "" if v is None else f"{v['mean']:.2f} ± {v['std']:.2f}"

    return _method_by_scenario(agg, [s for s in agg if not s.startswith("sequence")], cell)


def paired_interval(diffs, resamples: int = 10_000, seed: int = 0) -> dict:
    """{"mean_diff", "lo", "hi", "n"}: the mean of paired differences (one per seed) and its
    percentile bootstrap 95 % interval (2.5th and 97.5th percentiles of the means of `resamples`
    resamples with replacement, drawn by `np.random.default_rng(seed)`). Below two differences
    there is no interval: its bounds are NaN."""
    diffs = np.asarray(diffs, dtype=float)
    n = len(diffs)
    if n == 0:
        return {"mean_diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    mean = float(np.mean(diffs))
    if n == 1:
        return {"mean_diff": mean, "lo": float("nan"), "hi": float("nan"), "n": 1}
    means = diffs[np.random.default_rng(seed).integers(0, n, size=(resamples, n))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean_diff": mean, "lo": float(lo), "hi": float(hi), "n": n}


def paired_table(runs: list[dict], reference: str = "hf_amnesia", metric: str = "avg_gap_robust") -> dict:
    """scenario -> baseline -> `paired_interval` of (reference's `metric` - baseline's), one
    difference per run that has both (the same seed's split, model and forget set).

    Negative means the reference is closer to Retrain. Retrain, the reference itself and the rows
    of a request sequence (`method@k`) are not baselines; a non-finite value drops that run's pair.
    """
    out = {}
    for scenario in dict.fromkeys(s for r in runs for s in r):
        rows = [r[scenario] for r in runs if scenario in r]
        baselines = dict.fromkeys(m for row in rows for m in row)
        table = {}
        for baseline in baselines:
            if baseline in (reference, "retrain") or "@" in baseline:
                continue
            diffs = [
                row[reference][metric] - row[baseline][metric]
                for row in rows
                if metric in row.get(reference, {}) and metric in row.get(baseline, {})
            ]
            diffs = [d for d in diffs if np.isfinite(d)]
            if diffs:
                table[baseline] = paired_interval(diffs)
        if table:
            out[scenario] = table
    return out


def paired_markdown(paired: dict, reference: str = "hf_amnesia", metric: str = "avg_gap_robust") -> str:
    """`paired_table`'s output as a markdown table, a row per scenario and baseline."""
    lines = [
        f"{reference}'s {metric} minus each baseline's, paired by seed; bootstrap 95 % interval "
        "(negative = closer to Retrain).",
        "",
        "| scenario | baseline | mean diff | 95 % interval | n |",
        "|---|---|---|---|---|",
    ]
    for scenario, baselines in paired.items():
        for baseline, v in baselines.items():
            lines.append(
                f"| {scenario} | {baseline} | {v['mean_diff']:+.2f} | "
                + ("n < 2" if np.isnan(v["lo"]) else f"[{v['lo']:+.2f}, {v['hi']:+.2f}]")
                + f" | {v['n']} |"
            )
    return "\n".join(lines)


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


def _write(out: str, name: str, text: str) -> None:
    with open(os.path.join(out, name), "w") as f:
        f.write(text + "\n")


def write_aggregate(folders: list[str], out: str, reference: str = "hf_amnesia") -> dict:
    """Read each folder's results.json and write every output named in the module docstring to
    `out`; returns the aggregate."""
    runs = []
    for folder in folders:
        with open(os.path.join(folder, "results.json")) as f:
            runs.append(json.load(f))
    agg = aggregate(runs)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "aggregate.json"), "w") as f:
        json.dump(agg, f, indent=1)
    _write(out, "aggregate.md", to_markdown(agg))
    gaps = gap_table(agg)
    _write(out, "gaps.md", gaps)
    print(gaps)
    if any("avg_gap_robust" in values for methods in agg.values() for values in methods.values()):
        _write(out, "gaps_robust.md", gap_table(agg, "avg_gap_robust"))
    paired = paired_table(runs, reference=reference)
    with open(os.path.join(out, "paired.json"), "w") as f:
        json.dump(paired, f, indent=1)
    _write(out, "paired.md", paired_markdown(paired, reference=reference))
    parts = count_parts(runs)
    if parts:
        _write(out, "counts.md", count_table(parts))
    return agg


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="output_dir of each run (holding results.json)")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--reference", default="hf_amnesia", help="method whose avg_gap_robust paired.json compares with the others"
    )
    args = parser.parse_args(argv)
    write_aggregate(args.runs, args.out, reference=args.reference)


if __name__ == "__main__":
    main()

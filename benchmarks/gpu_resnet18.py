"""Recording overhead of a ResNet-18 class network on CIFAR-100-shaped data, for a GPU machine.

    python benchmarks/gpu_resnet18.py            # on a GPU: width 64 (11M parameters), batch 128
    python benchmarks/gpu_resnet18.py --smoke    # a tiny CPU run that checks the script works

Prints the plain and recording step times and, as its last line, one JSON object with
`overhead_resnet18` and `overhead_resnet18_entries` (AmnesiacTrainer / plain Trainer, median
step time over a 200-step run, keep_fraction 0.01, the default `rows` layout and `entries`),
`overhead_resnet18_tails_full` (the same over the last 25 steps, when every momentum tail is
open), measured side by side (alternating plain and recording runs), the peak GPU memory ratio
(`rows` / plain) and the device's name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Array3D, Dataset, Features, Value

if __package__ in (None, ""):  # run as a file, not with -m: make `benchmarks` and `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import run
from recipes.cifar100 import ResNet18GN


def cifar_like(n: int) -> Dataset:
    rng = np.random.default_rng(0)
    features = Features({"pixel_values": Array3D((3, 32, 32), "float32"), "labels": Value("int64")})
    return Dataset.from_dict(
        {"pixel_values": rng.normal(size=(n, 3, 32, 32)).astype(np.float32), "labels": rng.integers(0, 100, n)},
        features=features,  # fixed-shape arrays load as tensors in one piece, not as nested lists
    ).with_format("torch")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the plain and recording runs")
    args = parser.parse_args(argv)
    width, batch, steps = (4, 8, 12) if args.smoke else (64, 128, 200)

    def make_model():
        torch.manual_seed(0)
        return ResNet18GN(num_classes=100, width=width)

    layouts = ("rows", "entries")  # the default layout first
    data = cifar_like(batch * 40)  # several epochs: max_steps sets the run's length
    full = steps - steps // 8  # the last eighth: every momentum tail is open (W = 153 steps at beta1 0.9)
    cuda = torch.cuda.is_available()
    print(
        f"training on {'cuda' if cuda else 'cpu'} ({torch.cuda.get_device_name(0) if cuda else 'no GPU'})", flush=True
    )
    times, peaks = {"plain": [], **{layout: [] for layout in layouts}}, {}
    for _ in range(args.rounds):  # alternate plain and recording runs to share the machine's noise
        for name in times:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            record = dict(record=False) if name == "plain" else dict(record=True, keep_layout=name)
            began = time.perf_counter()
            times[name].append(run.step_times(make_model, data, batch, steps, **record))
            print(
                f"{name}: {steps} steps in {time.perf_counter() - began:.1f} s (setup and the end of training"
                f" included), median step {statistics.median(times[name][-1][3:]) * 1e3:.1f} ms",
                flush=True,
            )
            if cuda:
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
    best = {name: min(statistics.median(t[3:]) for t in runs) for name, runs in times.items()}
    late = {name: min(statistics.median(t[full:]) for t in runs) for name, runs in times.items()}
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    params = sum(p.numel() for p in make_model().parameters())
    print(
        f"ResNet-18 GN ({params:,} params), batch {batch}, p=0.01 on {device}: plain {best['plain'] * 1e3:.1f} ms/step, "
        + ", ".join(f"{name} {best[name] * 1e3:.1f} ms/step ({best[name] / best['plain']:.2f}x)" for name in layouts)
    )
    result = {
        "overhead_resnet18": best["rows"] / best["plain"],
        "overhead_resnet18_entries": best["entries"] / best["plain"],
        "overhead_resnet18_tails_full": late["rows"] / late["plain"],
    }
    if cuda:
        print("peak GPU memory (MiB): " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in peaks.items()))
        result["peak_mem_ratio_resnet18"] = peaks["rows"] / peaks["plain"]
    print(
        json.dumps({**{k: round(v, 4) for k, v in result.items()}, "device": device, "params": params, "batch": batch})
    )


if __name__ == "__main__":
    main()

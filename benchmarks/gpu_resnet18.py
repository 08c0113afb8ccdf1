"""Recording overhead of a ResNet-18 class network on CIFAR-100-shaped data, for a GPU machine.

    python benchmarks/gpu_resnet18.py            # on a GPU: width 64 (11M parameters), batch 128
    python benchmarks/gpu_resnet18.py --smoke    # a tiny CPU run that checks the script works

Prints the plain and recording step times and, as its last line, one JSON object with
`overhead_resnet18` and `overhead_resnet18_entries` (AmnesiacTrainer / plain Trainer, median
step time, keep_fraction 0.01, the default `rows` layout and `entries`), measured side by side (alternating
plain and recording runs), and the device's name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
import run  # noqa: E402
from cifar100 import ResNet18GN  # noqa: E402


def cifar_like(n: int) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset.from_dict(
        {"pixel_values": rng.normal(size=(n, 3, 32, 32)).astype(np.float32), "labels": rng.integers(0, 100, n)}
    ).with_format("torch")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    width, batch, steps = (4, 8, 5) if args.smoke else (64, 128, 20)

    def make_model():
        torch.manual_seed(0)
        return ResNet18GN(num_classes=100, width=width)

    layouts = ("rows", "entries")  # the default layout first
    ratio, plain, amnesiac = run.overhead(make_model, cifar_like(batch * steps), batch, steps, layouts=layouts)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    params = sum(p.numel() for p in make_model().parameters())
    print(
        f"ResNet-18 GN ({params:,} params), batch {batch}, p=0.01 on {device}: plain {plain * 1e3:.1f} ms/step, "
        + ", ".join(f"{layout} {amnesiac[layout] * 1e3:.1f} ms/step ({ratio[layout]:.2f}x)" for layout in layouts)
    )
    result = {"overhead_resnet18": ratio["rows"], "overhead_resnet18_entries": ratio["entries"]}
    print(
        json.dumps({**{k: round(v, 4) for k, v in result.items()}, "device": device, "params": params, "batch": batch})
    )


if __name__ == "__main__":
    main()

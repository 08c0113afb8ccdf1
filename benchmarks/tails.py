"""Bounded momentum tails: their completeness error, and the tail memory the planner states.

    python benchmarks/tails.py            # about 8 minutes on 2 CPU cores
    python benchmarks/tails.py --smoke    # a few steps: checks the script works
    python benchmarks/tails.py --sweep 4,16,32,64   # also the bounded error at these L

Prints, as its last line, one JSON object with `completeness_rel_err_exact` and
`completeness_rel_err_bounded` (the benchmark's tiny BERT, AdamW with decay, clipping, warmup and
a linear schedule, every entry kept, L forced to 8 steps; |sum of all deltas - training change| /
|training change|), `tail_memory_mb_resnet18` and `tail_memory_mb_resnet18_exact` (the planner's
peak open-tail memory for ResNet-18 with GroupNorm, batch 128, p = 0.01, at the default budget
and with a budget that holds every tail).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file, not with -m: make `benchmarks` and `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_amnesia import AmnesiaConfig, AmnesiacTrainer, StoreReader, plan
from hf_amnesia.attribution import open_tail_bound
from hf_amnesia.forgetting import forget_update
from recipes.cifar100 import ResNet18GN


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


def completeness(open_steps: int | None, steps: int, batch: int = 8) -> float:
    """|sum of every sample's delta - the training change| / |training change| of one run of the
    tiny BERT, the tails exact (`open_steps` None) or bounded to `open_steps` steps."""
    from benchmarks import run  # here: run.py imports this module

    model = run.bert()
    theta0, m = _flat(model), sum(p.numel() for p in model.parameters())
    budget = 1e9 if open_steps is None else open_tail_bound(open_steps, batch, m, m) / 2**20  # exact: holds all
    with tempfile.TemporaryDirectory() as out:
        args = AmnesiaConfig(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-3,
            weight_decay=0.01, warmup_steps=steps // 10, lr_scheduler_type="linear", max_grad_norm=1.0,
            keep_fraction=1.0, store_dtype="float32", report_to=[], save_strategy="no", use_cpu=run.USE_CPU,
            disable_tqdm=True, logging_strategy="no", seed=0, tail_memory_budget_mb=budget,
        )  # fmt: skip
        AmnesiacTrainer(model=model, args=args, train_dataset=run.texts(batch * 16)).train()
        reader = StoreReader(args.store_dir)
        assert reader.manifest.bounded_tail_steps == open_steps
        q = torch.tensor(reader.manifest.decay, dtype=torch.float64)
        change = _flat(model) - q.repeat_interleave(torch.tensor(reader.manifest.layout.numels)) * theta0
        total = forget_update(reader, reader.all_ids())
        return float((total - change).norm() / change.norm())


def resnet18_tail_memory_mb(budget_mb: float) -> float:
    with torch.device("meta"):  # shapes only
        model = ResNet18GN(num_classes=100, width=64)
    figures = plan(model, num_rows=50_000, batch_size=128, epochs=10, tail_memory_budget_mb=budget_mb)
    return figures.tail_memory_bytes / 2**20


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--sweep", default="", help="comma-separated L: completeness_rel_err_bounded_L<L> too")
    args = parser.parse_args(argv)
    steps = 12 if args.smoke else 160
    result = {
        "completeness_rel_err_exact": completeness(None, steps),
        "completeness_rel_err_bounded": completeness(8, steps),
        "tail_memory_mb_resnet18": resnet18_tail_memory_mb(AmnesiaConfig.tail_memory_budget_mb),
        "tail_memory_mb_resnet18_exact": resnet18_tail_memory_mb(1e9),
    }
    for open_steps in [int(x) for x in args.sweep.split(",") if x]:
        result[f"completeness_rel_err_bounded_L{open_steps}"] = completeness(open_steps, steps)
    print(
        f"tiny BERT, {steps} steps, every entry kept: completeness error exact {result['completeness_rel_err_exact']:.2e}, "
        f"bounded to 8 steps {result['completeness_rel_err_bounded']:.2e}; ResNet-18 (GN, batch 128, p=0.01) open "
        f"tails: {result['tail_memory_mb_resnet18']:,.0f} MiB at the default budget, "
        f"{result['tail_memory_mb_resnet18_exact']:,.0f} MiB exact"
    )
    print(json.dumps({k: float(f"{v:.4g}") for k, v in result.items()}))


if __name__ == "__main__":
    main()

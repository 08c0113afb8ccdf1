"""CIFAR-100 unlearning study: a ResNet-18 with GroupNorm, recorded, forgotten, compared with Retrain.

    accelerate launch recipes/cifar100.py --output_dir outputs/cifar100
    accelerate launch recipes/cifar100.py --dataset_name /path/to/parquet_or_save_to_disk --output_dir outputs/cifar100
    accelerate launch --multi_gpu --num_processes 2 recipes/cifar100.py --use_cpu --output_dir outputs/cifar100

`--forget_class` is a fine label (default 3). Every `TrainingArguments` / `AmnesiaConfig` flag
works. Augmentation (random crop with 4-pixel padding, horizontal flip) is applied per sample
inside the model in training mode, so no torchvision is needed and per-sample gradients stay
per sample. Writes results.json, results.md, results.png and run.json to --output_dir.
"""

from __future__ import annotations

import math
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

MEAN = np.array([0.5071, 0.4865, 0.4409], dtype=np.float32)
STD = np.array([0.2673, 0.2564, 0.2762], dtype=np.float32)
DEFAULTS = dict(
    learning_rate=1e-3,
    per_device_train_batch_size=128,
    num_train_epochs=30,
    weight_decay=5e-4,
    max_grad_norm=0.0,
    lr_scheduler_type="cosine",
    warmup_steps=0.02,
    report_to="none",
    save_strategy="no",
    logging_strategy="epoch",
    disable_tqdm=True,
    keep_fraction=0.001,
)


@dataclass
class CifarArguments(StudyArguments):
    dataset_name: str = field(
        default="uoft-cs/cifar100", metadata={"help": "Hub id or local folder (parquet, save_to_disk)."}
    )
    model_width: int = field(default=64, metadata={"help": "Channels of the first ResNet stage (64 = ResNet-18)."})


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = _norm(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18GN(nn.Module):
    """ResNet-18 for 32x32 inputs with GroupNorm instead of BatchNorm (per-sample gradients need it)."""

    def __init__(self, num_classes: int = 100, width: int = 64, augment: bool = True):
        super().__init__()
        self.augment = augment
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.stem_norm = _norm(width)
        layers, cin = [], width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def _augment(self, x):
        # Per sample: random crop of the 4-pixel zero-padded image, and a horizontal flip.
        batch, _, h, w = x.shape
        padded = nn.functional.pad(x, (4, 4, 4, 4))
        dy = torch.randint(0, 9, (batch,), device=x.device)
        dx = torch.randint(0, 9, (batch,), device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(-1, x.shape[1], -1, w + 8)
        cropped = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(-1, x.shape[1], h, -1)
        cropped = cropped.gather(3, cols)
        flip = torch.rand(batch, device=x.device) < 0.5
        return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)

    def forward(self, pixel_values, labels=None):
        x = self._augment(pixel_values) if (self.training and self.augment) else pixel_values
        x = torch.relu(self.stem_norm(self.stem(x)))
        x = self.layers(x)
        logits = self.head(x.mean(dim=(2, 3)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def _prepare(split) -> Dataset:
    images = np.stack(
        [np.asarray(img.convert("RGB") if hasattr(img, "convert") else img, dtype=np.uint8) for img in split["img"]]
    )
    pixels = ((images.astype(np.float32) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)
    return Dataset.from_dict(
        {
            "pixel_values": pixels,
            "labels": np.asarray(split["fine_label"], dtype=np.int64),
            "coarse_label": np.asarray(split["coarse_label"], dtype=np.int64),
        }
    ).with_format("torch", columns=["pixel_values", "labels"], output_all_columns=True)


def get_datasets(args: CifarArguments, seed: int) -> tuple[Dataset, Dataset]:
    raw = load_image_dataset(args.dataset_name)
    train, test = raw["train"], raw["test"]
    if args.max_train_samples:
        train = train.shuffle(seed=seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_test_samples:
        test = test.select(range(min(args.max_test_samples, len(test))))
    return _prepare(train).remove_columns("coarse_label"), _prepare(test).remove_columns("coarse_label")


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((CifarArguments, AmnesiaConfig))
    parser.set_defaults(**DEFAULTS)
    script_args, config = parser.parse_args_into_dataclasses(args=argv)
    state = PartialState()
    with state.main_process_first():
        train, test = get_datasets(script_args, config.seed)
    make_model = lambda: ResNet18GN(num_classes=100, width=script_args.model_width)  # noqa: E731
    results, meta = run_study(make_model, train, test, config, script_args, log=state.print)
    if state.is_main_process:
        state.print(write_outputs(results, meta, config.output_dir, argv))
    return results


if __name__ == "__main__":
    main()
    PartialState().destroy_process_group()  # under accelerate launch / torchrun: a clean exit

"""`AmnesiaConfig`: `TrainingArguments` plus what recording and forgetting need."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .errors import ConfigError, UnsupportedTrainingError
from .store import KEEP_LAYOUTS, STORE_DTYPES
from .validate import SHARDED

DEFAULT_KEEP_FRACTION = 0.01
DEFAULT_STORE_DTYPE = "float16"
DEFAULT_KEEP_SEED = 0
DEFAULT_KEEP_LAYOUT = "rows"
STORE_FOLDER = "_amnesia_store"


def training_fields(args: TrainingArguments) -> dict:
    """The `TrainingArguments` fields of `args` (an `AmnesiaConfig` or not), by name: the one
    conversion between the two (values kept as they are, tokens included, unlike `to_dict()`)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}


@dataclass
class AmnesiaConfig(TrainingArguments):
    """Training arguments of an `AmnesiacTrainer`.

    `keep_fraction`, `store_dtype` and `keep_seed` are fixed by the store once it exists: leave
    them unset (None) to take the store's values, or to get the defaults for a new store.
    """

    keep_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Fraction p of each sample's delta entries kept in the store, 0 < p <= 1 "
            f"(default {DEFAULT_KEEP_FRACTION}; an existing store's value wins)."
        },
    )
    store_dir: str | None = field(
        default=None,
        metadata={
            "help": f"Folder of the per-sample store (default <output_dir>/{STORE_FOLDER}; the leading "
            "underscore keeps it out of push_to_hub uploads, and a store_dir they would include is refused)."
        },
    )
    store_dtype: str | None = field(
        default=None,
        metadata={
            "help": f"Value type on disk: one of {sorted(STORE_DTYPES)} (default {DEFAULT_STORE_DTYPE}; float32 for a "
            "PEFT model, whose adapters are small)."
        },
    )
    id_column: str = field(
        default="dataset_id",
        metadata={"help": "Column holding each row's integer dataset id; without it, the row index is used."},
    )
    keep_layout: str | None = field(
        default=None,
        metadata={
            "help": f"Which entries each sample keeps: one of {list(KEEP_LAYOUTS)}: random single `entries`, or "
            f"whole `rows` (output units) of each weight, cheaper to compute (default {DEFAULT_KEEP_LAYOUT}; an "
            "existing store's value wins)."
        },
    )
    keep_seed: int | None = field(
        default=None,
        metadata={"help": f"Seed of the kept positions (default {DEFAULT_KEEP_SEED})."},
    )
    sum_deltas_in_memory: bool | None = field(
        default=None,
        metadata={
            "help": "Sum each sample's closed deltas in memory on the training device (N*K*4 bytes per process "
            "for N training rows) and write them to the log only at checkpoints and at the end, instead of "
            "copying and writing every step's (docs/limits.md, Speed). Unset: on when train_dataset is a "
            "datasets.Dataset whose sums take at most 1 GiB.",
            # a bare --sum_deltas_in_memory on the command line still means True (HfArgumentParser reads these)
            "nargs": "?",
            "const": True,
        },
    )
    tail_tolerance: float = field(
        default=1e-7,
        metadata={
            "help": "A step's momentum tail is closed once beta1^(steps since) falls below this "
            "(0 < tolerance < 1); the relative error left out is about this value."
        },
    )
    tail_memory_budget_mb: float = field(
        default=1024.0,
        metadata={
            "help": "Memory the open momentum tails may take on the training device, per process. When a step's "
            "tail would stay open longer than fits, it is closed early and its rest estimated with the Adam "
            "denominator frozen (bounded tails, docs/limits.md); within the budget the tails are exact."
        },
    )

    def __post_init__(self):
        if self.fsdp or self.deepspeed:  # refused before TrainingArguments sets the sharding up
            raise UnsupportedTrainingError(SHARDED)
        super().__post_init__()
        if self.keep_fraction is not None and not (0.0 < float(self.keep_fraction) <= 1.0):
            raise ConfigError(f"keep_fraction must satisfy 0 < keep_fraction <= 1, got {self.keep_fraction}.")
        if self.store_dtype is not None and self.store_dtype not in STORE_DTYPES:
            raise ConfigError(f"store_dtype must be one of {sorted(STORE_DTYPES)}, got {self.store_dtype!r}.")
        if self.keep_layout is not None and self.keep_layout not in KEEP_LAYOUTS:
            raise ConfigError(f"keep_layout must be one of {list(KEEP_LAYOUTS)}, got {self.keep_layout!r}.")
        if self.keep_seed is not None and not (0 <= int(self.keep_seed) < 2**32):
            raise ConfigError(f"keep_seed must be an integer in [0, 2**32), got {self.keep_seed}.")
        if not (0.0 < self.tail_tolerance < 1.0):
            raise ConfigError(f"tail_tolerance must satisfy 0 < tail_tolerance < 1, got {self.tail_tolerance}.")
        if not (0.0 < float(self.tail_memory_budget_mb) < math.inf):
            raise ConfigError(
                f"tail_memory_budget_mb must be a positive, finite number of MiB, got {self.tail_memory_budget_mb}; a "
                "budget larger than the planner's exact figure (hf_amnesia.plan) keeps every tail exact."
            )
        if not self.id_column or not isinstance(self.id_column, str):
            raise ConfigError(f"id_column must be a non-empty column name, got {self.id_column!r}.")
        if self.store_dir is None:
            self.store_dir = os.path.join(self.output_dir, STORE_FOLDER)

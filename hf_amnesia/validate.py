"""What cannot be recorded exactly: every refusal of a model, a training setup or an optimizer.

Each check returns all the `Problem`s it finds (the error type and a message that says what to
do); `raise_problems` raises them together. The trainer checks the model and its arguments (hub
pushes included) before `Trainer.__init__`, the launch after it, the optimizer when it is created,
and hub pushes again before each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.utils import filter_repo_objects
from torch import nn

from .errors import (
    AmnesiaError,
    ConfigError,
    UnsupportedModelError,
    UnsupportedOptimizerError,
    UnsupportedTrainingError,
)

SHARDED = (
    "FSDP and DeepSpeed shard parameters and optimizer state, so per-sample deltas cannot be "
    "replayed exactly. Train with plain DDP (accelerate launch --multi_gpu) instead."
)


@dataclass(frozen=True)
class Problem:
    error: type[AmnesiaError]
    message: str


def raise_problems(problems: list[Problem]) -> None:
    """Raise every problem in one error of the first problem's type (nothing if there is none)."""
    if not problems:
        return
    if len(problems) == 1:
        raise problems[0].error(problems[0].message)
    listed = "\n".join(f"  {n}. {p.message}" for n, p in enumerate(problems, start=1))
    raise problems[0].error(f"{len(problems)} problems:\n{listed}")


def model_problems(model: nn.Module) -> list[Problem]:
    """Layers whose per-sample updates are not defined (batch statistics)."""
    problems = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            problems.append(
                Problem(
                    UnsupportedModelError,
                    f"{name or 'model'} is a {type(module).__name__}: batch statistics mix samples, so per-sample "
                    "deltas are not defined. Replace it with GroupNorm, e.g. "
                    "`model = opacus.validators.ModuleValidator.fix(model)`.",
                )
            )
    return problems


def nothing_to_record() -> Problem:
    """The model to record has no trainable entry."""
    return Problem(UnsupportedModelError, "the model has no trainable parameters; nothing can be recorded.")


def training_problems(args) -> list[Problem]:
    """Settings of `TrainingArguments` that break the per-sample replay."""
    problems = []
    if args.gradient_checkpointing:
        problems.append(
            Problem(
                UnsupportedTrainingError,
                "gradient_checkpointing=True re-runs the forward pass inside backward, which breaks the "
                "per-sample hooks. Set gradient_checkpointing=False (use a smaller batch to save memory).",
            )
        )
    if args.fsdp or args.deepspeed:
        problems.append(Problem(UnsupportedTrainingError, SHARDED))
    return problems


# What Trainer leaves out when it uploads output_dir (`push_to_hub`, and the model push at each save).
TRAINER_UPLOAD_IGNORES = ["_*", "checkpoint-*"]
CHECKPOINT_STRATEGIES = ("checkpoint", "all_checkpoints")  # hub strategies that upload checkpoint folders


def hub_problems(args, recording: bool) -> list[Problem]:
    """Hub pushes that would upload per-sample data: a checkpoint's recorder state, or the store."""
    problems = []
    strategy = getattr(args.hub_strategy, "value", args.hub_strategy)  # a HubStrategy, or its name
    if args.push_to_hub and recording and strategy in CHECKPOINT_STRATEGIES:
        problems.append(
            Problem(
                ConfigError,
                f"hub_strategy={strategy!r} with push_to_hub=True uploads each checkpoint folder "
                "whole, and Trainer has no way to leave a file out of that upload: an AmnesiacTrainer's "
                "checkpoints hold its recorder state (amnesia_recorder-*.safetensors: per-sample ids and "
                "contributions), which must not leave this machine. Use hub_strategy='every_save' or 'end' (the "
                "model is pushed, the checkpoints stay here), or record=False.",
            )
        )
    if args.push_to_hub:
        problems += store_upload_problems(args.store_dir, args.output_dir)
    return problems


def store_upload_problems(store_dir: str | os.PathLike, output_dir: str | os.PathLike) -> list[Problem]:
    """A store inside `output_dir` that Trainer's upload of `output_dir` would not leave out."""
    store, output = Path(store_dir).resolve(), Path(output_dir).resolve()
    if store != output and output not in store.parents:
        return []
    inside = store.relative_to(output).as_posix()
    if not list(filter_repo_objects([f"{inside}/manifest.json"], ignore_patterns=TRAINER_UPLOAD_IGNORES)):
        return []
    return [
        Problem(
            ConfigError,
            f"store_dir={str(store_dir)!r} lies inside output_dir={str(output_dir)!r}, where push_to_hub would "
            f"upload it ({inside!r}): the store holds per-sample deltas and ids, which must not leave this "
            "machine. Move it outside output_dir, or into a folder of output_dir whose name starts with an "
            "underscore (Trainer's uploads leave `_*` out; the default store_dir is <output_dir>/_amnesia_store).",
        )
    ]


def launch_problems(sharded: bool, n_gpu: int) -> list[Problem]:
    """How the Trainer set the run up: sharded by accelerate, or several GPUs driven by one process
    (a model placed across GPUs counts as one)."""
    problems = []
    if sharded:
        problems.append(Problem(UnsupportedTrainingError, SHARDED))
    if n_gpu > 1:
        problems.append(
            Problem(
                UnsupportedTrainingError,
                f"{n_gpu} GPUs in one process (torch DataParallel) are not supported; launch one "
                "process per GPU with `accelerate launch` or `torchrun`.",
            )
        )
    return problems


def optimizer_problems(optimizer: torch.optim.Optimizer) -> list[Problem]:
    """Optimizers whose update cannot be split exactly per sample (anything but torch Adam/AdamW)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
        return [
            Problem(
                UnsupportedOptimizerError,
                f"{type(inner).__name__} is not supported: exact per-sample deltas are derived for torch Adam and "
                "AdamW only. Use optim='adamw_torch' (the default) or pass a torch.optim.AdamW.",
            )
        ]
    problems = []
    for group in inner.param_groups:
        if group.get("amsgrad") or group.get("maximize"):
            problems.append(
                Problem(
                    UnsupportedOptimizerError, "Adam/AdamW with amsgrad or maximize is not supported; turn them off."
                )
            )
        if type(inner) is torch.optim.Adam and group["weight_decay"] and not group.get("decoupled_weight_decay"):
            problems.append(
                Problem(
                    UnsupportedOptimizerError,
                    "torch Adam with weight_decay > 0 adds an L2 term to the gradient that cannot be split per "
                    "sample. Use AdamW (decoupled decay) or weight_decay=0.",
                )
            )
    return list(dict.fromkeys(problems))  # one line per kind of problem, however many groups share it

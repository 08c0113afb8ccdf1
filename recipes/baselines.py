"""The study's baselines and rules for comparison: what the recipes run beside `forget(ids)`.

- the per-batch storage of Graves et al. (`PerBatchRecorder`, `StudyTrainer`) and its subtraction
  (`per_batch_forget`), whole or with a random subset of each step kept;
- NegGrad's loss (`negated_cross_entropy`), for `hf_amnesia.forgetting.finetune`;
- the per-tensor norm rule (`norm_rule_forget`), built from the forgetting package's parts.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from hf_amnesia import AmnesiacTrainer, ForgetConfig
from hf_amnesia.forgetting import forget_update
from hf_amnesia.forgetting.prepare import gather
from hf_amnesia.forgetting.repair import repair_until_restored
from hf_amnesia.layout import ParamLayout
from hf_amnesia.store import StoreReader


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


def set_flat(model: nn.Module, theta: torch.Tensor) -> None:
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta.to(next(model.parameters()).device), model.parameters())


class PerBatchRecorder(TrainerCallback):
    """Baseline storage (Graves et al.): the dense change of every step that held a planned forget id."""

    def __init__(self, trainer: StudyTrainer, planned: dict[str, set[int]], folder: Path):
        self.trainer, self.planned = trainer, planned
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "per_batch_updates.f32"
        self.path.unlink(missing_ok=True)
        self.steps: dict[str, list[int]] = {name: [] for name in planned}
        self.rows = 0
        self.previous: torch.Tensor | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous = flat(self.trainer.model)

    def on_step_end(self, args, state, control, **kwargs):
        ids, self.trainer.step_ids = self.trainer.step_ids, []
        flags = torch.tensor([float(any(i in self.planned[n] for i in ids)) for n in self.planned])
        flags = self.trainer.accelerator.reduce(flags.to(self.trainer.accelerator.device), reduction="sum").cpu()
        now = flat(self.trainer.model)
        if flags.any():
            with open(self.path, "ab") as f:
                f.write((now - self.previous).numpy().tobytes())
            for name, flag in zip(self.planned, flags.tolist()):
                if flag:
                    self.steps[name].append(self.rows)
            self.rows += 1
        self.previous = now

    def updates(self, scenario: str, num_params: int) -> np.ndarray:
        table = np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.rows, num_params))
        return table[self.steps[scenario]]


class StudyTrainer(AmnesiacTrainer):
    """AmnesiacTrainer that also notes the ids of each step, for the per-batch baselines."""

    step_ids: list[int]

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.step_ids = (
            getattr(self, "step_ids", []) + torch.as_tensor(inputs[self.args.id_column]).reshape(-1).tolist()
        )
        return super().training_step(model, inputs, num_items_in_batch)


def negated_cross_entropy(outputs, labels, num_items_in_batch=None):
    """NegGrad's loss: maximise the cross-entropy on the forget set."""
    return -nn.functional.cross_entropy(outputs["logits"], labels)


def norm_rule_forget(trainer: AmnesiacTrainer, forget_ids: np.ndarray, initial: nn.Module, num_train: int) -> int:
    """The per-tensor closed form `s_l = (|F| / N) * ||theta_T,l - theta_0,l|| / ||u_l||`, then the automatic repair
    (a plain one, as for a request without a holdout). A rule for comparison: it needs the initial weights, which
    the store does not keep. Built from the forgetting package's parts; returns the repair's steps."""
    context, policy = trainer.forget_context(), ForgetConfig()
    model, args = context.model, context.args
    data = gather(
        context.train_dataset,
        id_column=args.id_column,
        seed=args.seed,
        planned_steps=context.planned_steps(StoreReader(args.store_dir).recorded_count()),
        ids=forget_ids,
        todo=forget_ids,
        forgotten=trainer.forgotten_ids(),
        holdout=None,
        whole_class=None,
        need_holdout=False,
        hold_unseen=False,
        config=policy,
        sequence_rows=context.measure.sequence_rows,
    )
    data.original_accuracy = context.measure.accuracy(data.retained_sample)
    update = forget_update(StoreReader(args.store_dir), forget_ids)
    layout = ParamLayout.from_model(model)
    starts = dict(initial.named_parameters())
    offset = 0
    with torch.no_grad():
        for name, param in zip(layout.names, layout.params_of(model)):
            piece = update[offset : offset + param.numel()].view(param.shape).to(param.dtype)
            offset += param.numel()
            norm = float(piece.norm())
            if norm > 0:
                change = float((param - starts[name]).norm())
                param.sub_(len(forget_ids) / num_train * change / norm * piece)
    return repair_until_restored(model, data, None, context.measure, args, policy)[0]


def per_batch_forget(
    original: nn.Module, updates: np.ndarray, theta_orig: torch.Tensor, keep: int, seed: int, subset: bool
) -> tuple[nn.Module, float, int]:
    """A copy of `original` minus the stored per-step changes (each reduced to `keep` random entries
    with `subset`): the model, the seconds it took, and the bytes those changes take."""
    num_params = theta_orig.numel()
    candidate = copy.deepcopy(original)
    began = time.perf_counter()
    total = torch.zeros(num_params)
    rng = np.random.default_rng(seed)
    for row in updates:
        row = torch.from_numpy(np.array(row))
        if subset:
            mask = torch.zeros(num_params)
            mask[torch.from_numpy(rng.choice(num_params, size=keep, replace=False))] = 1.0
            row = row * mask
        total += row
    set_flat(candidate, theta_orig - total)
    return candidate, time.perf_counter() - began, len(updates) * (keep if subset else num_params) * 4

"""The repair: an unrecorded fine-tune on the retained rows, with a plain `transformers.Trainer`.

`repair_until_restored` fine-tunes until the retained rows' accuracy (or, with criterion='loss',
their mean loss) is back at the original's.
Unless whole classes go, its loss (`HoldUnseenLoss`, the Trainer's `compute_loss_func`) is the
retained batch's cross-entropy (over its predicted tokens for sequences; label-smoothed as the
Trainer would) plus a hinge that holds the
forget rows no better fitted than held-out rows (`hold.unseen_targets`); the sum is a per-batch
mean, divided by the gradient accumulation steps like any such loss. This module and the trainer
are the only ones that know `Trainer`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.data.data_collator import default_data_collator
from transformers.trainer_pt_utils import LabelSmoother

from ..config import training_fields
from .config import ForgetConfig
from .hold import unseen_targets
from .measure import Measurer, batch_loss, logits_and_labels, logits_of, row_losses_of
from .prepare import ForgetData

logger = logging.getLogger(__name__)


def finetune(
    model: nn.Module,
    train_dataset,
    steps: int,
    args: TrainingArguments,
    data_collator=None,
    compute_loss_func: Callable | None = None,
    stop_when: Callable[[], bool] | None = None,
    check_every: int = 1,
) -> int:
    """Train `model` in place for `steps` optimizer steps at a constant learning rate, unrecorded.

    The repair of `forget`, and the fine-tune baseline of the recipes. `compute_loss_func`, if
    given, computes the loss from the model's outputs and the batch's labels (a classification
    loss, a per-batch mean: `HoldUnseenLoss`, or a recipe's NegGrad). With `stop_when`, training
    stops early once it returns True (checked every `check_every` steps). Rows keep their id
    column (`args.id_column`, for an `AmnesiaConfig`) out of the model. Returns the number of steps
    taken.
    """
    collate = data_collator or default_data_collator
    id_column = getattr(args, "id_column", "dataset_id")

    def collate_without_ids(rows):
        return collate([{k: v for k, v in row.items() if k != id_column} for row in rows])

    with tempfile.TemporaryDirectory() as tmp:
        fields = training_fields(args)
        fields.update(
            output_dir=tmp,
            max_steps=int(steps),
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            lr_scheduler_type="constant",
            warmup_steps=0,
            logging_strategy="no",
            push_to_hub=False,
            disable_tqdm=True,
            load_best_model_at_end=False,
        )
        if compute_loss_func is not None:  # the loss is a per-batch mean: no token averaging across devices
            _require_loss_scaling_attribute()
            fields.update(average_tokens_across_devices=False)
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**fields),
            train_dataset=train_dataset,
            data_collator=collate_without_ids,
            compute_loss_func=compute_loss_func,
        )
        if compute_loss_func is not None:
            trainer.loss_is_scaled_for_ga = False  # so the Trainer divides it by the accumulation steps
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        if stop_when is not None:
            trainer.add_callback(_StopWhen(stop_when, check_every))
        trainer.train()
        return int(trainer.state.global_step)


def _require_loss_scaling_attribute() -> None:
    """`Trainer.loss_is_scaled_for_ga` says that a `compute_loss_func`'s per-batch mean is still to be
    divided by the accumulation steps; a Trainer without it would skip that division silently."""
    if not hasattr(Trainer, "loss_is_scaled_for_ga"):
        import transformers

        raise ImportError(
            f"transformers {transformers.__version__} has no Trainer.loss_is_scaled_for_ga, which the repair's "
            "loss needs to be divided by the gradient accumulation steps. Install transformers>=5.19."
        )


class _StopWhen(TrainerCallback):
    def __init__(self, done, every: int):
        self.done, self.every = done, every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and self.done():
            control.should_training_stop = True


class HoldUnseenLoss:
    """The repair's loss when it holds the forget rows unseen: the retained batch's cross-entropy
    plus, on a batch of forget rows (in a seeded order), mean(relu(target_i - loss_i)) with
    `hold.unseen_targets` (rows the retained data does not support held at least at a
    misclassified held-out row's loss)."""

    def __init__(
        self,
        model: nn.Module,
        data: ForgetData,
        after_subtraction: np.ndarray,
        measure: Measurer,
        batch_size: int,
        seed: int,
        label_smoothing: float = 0.0,
    ):
        self.model, self.data, self.after_subtraction, self.measure = model, data, after_subtraction, measure
        self.rows = measure.rows_for_model(data.forget_rows)
        self.collate, self.id_column, self.batch_size = measure.collate, measure.id_column, batch_size
        self.smoother = LabelSmoother(epsilon=label_smoothing) if label_smoothing else None
        self.shift_labels = measure.shift_labels
        self.order = torch.Generator().manual_seed(seed)
        self.queue: list[int] = []

    def held(self) -> bool:
        """Whether the forget rows, all at once, fit no better than their targets on average."""
        losses = self.measure.row_losses(self.data.forget_rows)
        unsupported = self.data.unsupported
        targets = unseen_targets(
            losses, self.after_subtraction, self.data.held_out_losses, unsupported, self.data.misfit_loss
        )
        return float(np.mean(losses)) >= float(np.mean(targets))

    def __call__(self, outputs, labels, num_items_in_batch=None):
        if labels is None:
            raise ValueError(
                "the repair's batch has no `labels`: a custom data collator renamed or dropped them. "
                "Keep the labels under `labels` in the collated batch."
            )
        loss = batch_loss(logits_of(outputs), labels, self.shift_labels, self.smoother)
        if len(self.queue) < self.batch_size:  # the forget rows in a seeded order
            self.queue += torch.randperm(len(self.rows), generator=self.order).tolist()
        picked, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size :]
        batch = self.collate([self.rows[i] for i in picked])
        # the same rows on every process, so the model itself (not its DDP wrapper) serves
        logits, targets_of = logits_and_labels(self.model, batch, self.id_column)
        losses = row_losses_of(logits, targets_of.to(logits.device), self.shift_labels)
        unsupported = None if self.data.unsupported is None else self.data.unsupported[picked]
        targets = unseen_targets(
            losses.detach().cpu().numpy(),
            self.after_subtraction[picked],
            self.data.held_out_losses,
            unsupported,
            self.data.misfit_loss,
        )
        return loss + torch.relu(torch.as_tensor(targets, dtype=losses.dtype, device=losses.device) - losses).mean()


def repair_until_restored(
    model: nn.Module,
    data: ForgetData,
    after_subtraction: np.ndarray | None,
    measure: Measurer,
    args: TrainingArguments,
    config: ForgetConfig,
) -> tuple[int, bool]:
    """Fine-tune on the retained rows until their accuracy is back at the original's (one row of
    slack; under criterion='loss', their mean loss at most the original's), holding the forget
    rows unseen where `prepare.prepare_unseen_hold` set that up; a hold is done when the forget
    rows' mean loss has also reached their targets' mean (unless `config.hold_until_met` is off;
    an unmet hold does not count as a failed repair: only the retained rows do). When whole
    classes go, the repair runs its whole budget: stopped at the original's level, class
    requests ended further from Retrain (docs/history/2026-11-results-notebook.md, "A whole class's
    repair runs its whole budget"). Returns (steps taken, whether the retained rows are back)."""
    if config.criterion == "loss" and not np.isfinite(data.original_loss):
        raise ValueError(
            "criterion='loss' needs data.original_loss, the retained sample's mean loss before the subtraction."
        )
    if config.criterion == "loss":  # the original's score on them (accuracy: less one row of slack)
        target = -data.original_loss
    else:
        target = data.original_accuracy - 100.0 / len(data.retained_sample)
    loss = None
    if data.forget_rows is not None:
        loss = HoldUnseenLoss(
            model,
            data,
            after_subtraction,
            measure,
            args.per_device_train_batch_size,
            args.seed,
            label_smoothing=args.label_smoothing_factor,
        )

    def retained_back() -> bool:  # their accuracy back at the original's, or under criterion='loss' their mean loss
        return measure.score(data.retained_sample, config.criterion) >= target

    def restored() -> bool:  # the repair's end: the retained rows back, and a hold met
        return retained_back() and (loss is None or not config.hold_until_met or loss.held())

    if not data.classes and restored():
        return 0, True
    budget = config.repair_budget(data.planned_steps)
    steps = finetune(
        model,
        data.retained,
        budget,
        args,
        data_collator=measure.collate,
        compute_loss_func=loss,
        stop_when=None if data.classes else restored,
        check_every=config.repair_check_every(budget),
    )
    if steps >= budget and loss is not None and not loss.held():
        logger.info("forget: the repair's budget ran out before the forget rows fit like held-out ones.")
    return steps, steps < budget or retained_back()  # only the retained rows make the policy subtract less

"""`AmnesiacTrainer`: a `transformers.Trainer` that records per-sample deltas and can forget them.

Read top to bottom: construction and its checks, what changes in training (ids in, the recorder
driven around each microbatch and optimizer step, checkpoints), then `forget`, which hands the
request to `hf_amnesia.forgetting`.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .config import AmnesiaConfig, training_fields
from .data import dataset_ids, with_dataset_ids
from .errors import ConfigError, UnsupportedTrainingError
from .faults import crash_point
from .forgetting import ForgetConfig, ForgetContext, ForgetReport, Measurer, serve
from .forgetting.record import (
    refuse_forgotten_rows,
    register_run_end,
    register_run_start,
    run_start,
    run_start_standing,
    stored_forgotten_ids,
    write_record_file,
)
from .recorder import Recorder
from .recording import RECORDER_STATE, check_resume, hold_store, open_manifest, recording_plan, sums_in_memory
from .store import folder_bytes
from .store.journal import weights_fingerprint
from .validate import (
    hub_problems,
    launch_problems,
    model_problems,
    optimizer_problems,
    raise_problems,
    store_upload_problems,
    training_problems,
)

try:  # datasets is a dependency, but the trainer also takes torch datasets
    import datasets
except ImportError:  # pragma: no cover
    datasets = None

logger = logging.get_logger(__name__)


class AmnesiacTrainer(Trainer):
    """Drop-in `Trainer` that records each training sample's exact Adam/AdamW delta.

    Args are those of `Trainer`; `args` may be `None`, a `TrainingArguments` or an
    `AmnesiaConfig`. With `record=False` it trains without recording.
    """

    def __init__(self, model=None, args=None, train_dataset=None, *, record: bool = True, **kwargs):
        args = _as_amnesia_config(args)
        model_checks = model_problems(model) if model is not None else []
        raise_problems(model_checks + training_problems(args) + hub_problems(args, record))
        self._record = record
        self._recorder: Recorder | None = None
        self._resume_requested = False
        self._trained = False  # a recorded run finished on this trainer
        train_dataset = with_dataset_ids(train_dataset, args.id_column)
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        raise_problems(launch_problems(self.is_fsdp_enabled or self.is_deepspeed_enabled, args.n_gpu))

    # -- ids stay out of the model ---------------------------------------------------------------

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.args.id_column not in self._signature_columns:
            self._signature_columns.append(self.args.id_column)

    def prediction_step(self, model, inputs, *args, **kwargs):
        inputs.pop(self.args.id_column, None)
        return super().prediction_step(model, inputs, *args, **kwargs)

    # -- recording -------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        raise_problems(optimizer_problems(optimizer))
        if self._record:
            self._start_recorder(optimizer)
        return optimizer

    def _start_recorder(self, optimizer: torch.optim.Optimizer) -> None:
        accelerator, resuming = self.accelerator, self._resume_requested
        start, purged = run_start(self.model, self.args.store_dir, resuming)  # checked before the store changes
        need_ids = self.train_dataset is not None and ((start and start.digests) or len(purged))
        train_ids = dataset_ids(self.train_dataset, self.args.id_column) if need_ids else None
        if start is not None:
            refuse_forgotten_rows(start, train_ids, purged)
        manifest = open_manifest(
            self.model,
            self.args,
            self._resume_requested,
            accelerator.process_index,
            accelerator.num_processes,
            accelerator.wait_for_everyone,
        )
        sums = sums_in_memory(self.args.sum_deltas_in_memory, self.train_dataset, manifest.k)
        if sums and train_ids is None:
            train_ids = dataset_ids(self.train_dataset, self.args.id_column)
        self._standing = start or run_start_standing(self.model, manifest, self.args.store_dir, resuming)
        self._recorder = Recorder(
            self.model,
            optimizer,
            self.args.store_dir,
            manifest,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            tail_tolerance=self.args.tail_tolerance,
            sum_ids=train_ids if sums else None,
            tail_budget_bytes=self.args.tail_memory_budget_mb * 2**20,
            samples_per_step=self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps,
        )
        if not self._resume_requested:
            if accelerator.is_main_process:
                register_run_start(self.args.store_dir, manifest, self._standing)
            self._recorder.shard.begin()  # a resume goes back to its checkpoint's state instead
        rows = len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else None
        logger.warning(recording_plan(manifest, self._recorder, self.args, rows))
        self._record_started = time.perf_counter()

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self._recorder is not None:  # bounded tails estimate the rest of a tail from the planned rates
            self._recorder.plan_schedule(scheduler, num_training_steps)
        return scheduler

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids = inputs.pop(self.args.id_column, None)
        if self._recorder is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if ids is None:
            raise UnsupportedTrainingError(
                f"the training batch has no {self.args.id_column!r} column: a custom data collator dropped it. "
                "Keep that key in the collated batch."
            )
        self._recorder.begin_microbatch(torch.as_tensor(ids).cpu().numpy().reshape(-1))
        loss = super().training_step(model, inputs, num_items_in_batch)
        scaler = getattr(self.accelerator, "scaler", None)
        self._recorder.end_microbatch(float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0)
        return loss

    def _clip_grad_norm(self, model):
        total_norm = super()._clip_grad_norm(model)
        if self._recorder is not None:
            self._recorder.set_clip_coef(float(total_norm), self.args.max_grad_norm)
        return total_norm

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint in {self.args.output_dir} to resume from.")
        if not self._record:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        if self._trained:
            raise UnsupportedTrainingError(
                "train() already ran on this AmnesiacTrainer: its optimizer still holds that run's Adam "
                "momentum, which would keep moving the weights without being attributed to any sample. "
                "Continue training with a new AmnesiacTrainer on this model and store (its optimizer "
                "starts fresh; the store accepts a run that starts from the weights the last one ended with)."
            )
        self._resume_requested = resume_from_checkpoint not in (None, False)
        accelerator = self.accelerator
        if self._resume_requested:  # refused before the lock: a refusal writes nothing, not even `.lock`
            check_resume(self.args.store_dir, resume_from_checkpoint, accelerator.num_processes)
        with hold_store(self.args.store_dir, accelerator.is_main_process, accelerator.wait_for_everyone):
            if self._resume_requested:  # again: a forget may have committed while this run waited for the lock
                check_resume(self.args.store_dir, resume_from_checkpoint, accelerator.num_processes)
            failed = True
            try:
                output = super().train(resume_from_checkpoint, *args, **kwargs)
                if self._recorder is not None:
                    self._finish_recording()
                    self._trained = True
                failed = False
            finally:
                if self._recorder is not None:
                    self._recorder.close(after_error=failed)  # never hides the error that stopped training
                    self._recorder = None
        return output

    def _finish_recording(self) -> None:
        # The decay factors reach the manifest before any shard commits its new rows: a crash in
        # between leaves the run marked unfinished, and resuming it writes both again.
        self._recorder.close_tails()
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            manifest = self._recorder.manifest
            manifest.decay = self._recorder.decay.tolist()
            manifest.note_tails(self._recorder.bounded_steps)
            manifest.final_weights = weights_fingerprint(manifest.layout.params_of(self.model))
            manifest.save(Path(self.args.store_dir))
            end = self._standing.with_ids(manifest.final_weights, ())
            register_run_end(self.model, self.args.store_dir, manifest, end)
        self.accelerator.wait_for_everyone()
        self._recorder.compact()
        self.accelerator.wait_for_everyone()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._recorder is not None:
            elapsed = time.perf_counter() - self._record_started
            spent = self._recorder.record_seconds + self._recorder.capture.seconds
            logs["amnesia_record_time_share"] = round(spent / max(elapsed, 1e-9), 4)
            logs["amnesia_store_bytes"] = folder_bytes(self.args.store_dir) if Path(self.args.store_dir).exists() else 0
        super().log(logs, start_time)

    # -- checkpoints -----------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        # The recorder state goes first: Trainer writes trainer_state.json last, so a checkpoint
        # holding it is complete (see `last_complete_checkpoint`).
        if self._recorder is not None:
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            name = RECORDER_STATE.format(rank=self.accelerator.process_index)
            save_file(self._recorder.state_dict(), str(folder / name))
            crash_point("checkpoint:recorder_saved")
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self._recorder is not None:  # `check_resume` found the file and its store
            path = Path(checkpoint) / RECORDER_STATE.format(rank=self.accelerator.process_index)
            self._recorder.load_state_dict(load_file(str(path)))

    # -- hub pushes: nothing per-sample leaves the machine --------------------------------------

    def push_to_hub(self, *args, **kwargs):
        raise_problems(store_upload_problems(self.args.store_dir, self.args.output_dir))
        return super().push_to_hub(*args, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder):
        raise_problems(hub_problems(self.args, self._record))  # the args may have changed since __init__
        super()._push_from_checkpoint(checkpoint_folder)

    # -- forgetting ------------------------------------------------------------------------------

    def forget(
        self,
        dataset_ids,
        *,
        config: ForgetConfig | None = None,
        scale: float | str = "auto",
        repair_steps: int | str = "auto",
        holdout=None,
        whole_class: bool | None = None,
        strict: bool = False,
        save_to: str | os.PathLike | None = None,
        purge: bool = True,
    ) -> ForgetReport:
        """Subtract the stored deltas of `dataset_ids` from the model; optionally repair and commit.

        `forget(ids, scale=1.0, repair_steps=0)` is the exact subtraction of what those samples
        contributed to training, and needs no data. Ids already forgotten by this model are
        skipped; ids the store does not hold are reported in `unknown`, ids it purged for another
        model in `purged_elsewhere` (both raise with `strict=True`, before any change). The store
        serves only weights of its own lineage: another model raises `ModelLineageError`.

        With the defaults (`scale="auto"`, `repair_steps="auto"`), `config` (a `ForgetConfig`;
        docs/method.md, "The forget policy, step by step") chooses the scale on `holdout` (default: the
        trainer's `eval_dataset`; rows never trained on, not the test data you report) and
        repairs on the retained training rows. A request holding every training row of a label
        removes that class; this is detected from the labels, or stated with
        `whole_class=True/False`. A number for `scale` or `repair_steps` fixes that part.

        Without `save_to` only the weights in memory change. With `save_to=DIR` the request is one
        transaction under the store's lock: the model is saved to DIR, (with `purge=True`) the
        ids' rows are erased from the store, and an audit record is appended; a crash leaves all
        of it fully before or fully after.
        """
        return serve(
            self.forget_context(),
            dataset_ids,
            config=config,
            scale=scale,
            repair_steps=repair_steps,
            holdout=holdout,
            whole_class=whole_class,
            strict=strict,
            save_to=save_to,
            purge=purge,
        )

    def forget_context(self) -> ForgetContext:
        """What `forget` works with: the model, the data, how it measures the model (`measure`) and
        the training's planned steps; for studies that compose the forgetting package's parts."""
        return ForgetContext(
            model=self.model,
            args=self.args,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            measure=Measurer(
                self.model,
                self.data_collator,
                self.args.per_device_eval_batch_size,
                self.args.id_column,
                self._rows,
                shift_labels=is_causal_lm(self.model),
            ),
            planned_steps=self._planned_training_steps,
            save_model=self.save_model,
            is_main_process=self.accelerator.is_main_process,
            wait_for_everyone=self.accelerator.wait_for_everyone,
        )

    def forgotten_ids(self) -> list[int]:
        """Ids this model has already forgotten, by the store's record of its weights ([] without a
        store; `ModelLineageError` for a model the store does not serve)."""
        ids = dataset_ids(self.train_dataset, self.args.id_column) if self.train_dataset is not None else None
        return stored_forgotten_ids(self.model, self.args.store_dir, ids)

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.args.should_save:  # the record travels with whatever was saved, adapter folders too
            write_record_file(self.model, output_dir if output_dir is not None else self.args.output_dir)

    def _rows(self, dataset):
        """The columns of `dataset` the model takes (and the id column), as in training."""
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            return self._remove_unused_columns(dataset, description="forget")
        return dataset

    def _planned_training_steps(self, num_rows: int | None = None) -> int:
        """The training's optimizer steps: max_steps, or the epochs over `num_rows` rows (default:
        the train_dataset's)."""
        args = self.args
        if args.max_steps and args.max_steps > 0:
            return int(args.max_steps)
        per_step = args.per_device_train_batch_size * self.accelerator.num_processes * args.gradient_accumulation_steps
        rows = len(self.train_dataset) if num_rows is None else num_rows
        return math.ceil(math.ceil(rows / per_step) * args.num_train_epochs)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder whose trainer state and recorder state were both written."""
    found = []
    for folder in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = folder.name.rsplit("-", 1)[-1]
        if step.isdigit() and (folder / "trainer_state.json").exists() and any(folder.glob("amnesia_recorder-*")):
            found.append((int(step), str(folder)))
    return max(found)[1] if found else None


def influence_holders(output_dir: str | os.PathLike) -> list[str]:
    """Folders under `output_dir` that may still hold forgotten samples' influence.

    Trainer checkpoints hold weights from before a forget, and their recorder state holds open
    per-sample contributions. Models saved or pushed elsewhere before a forget are not visible
    here: the docs list them.
    """
    return sorted(str(p) for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir())


def _as_amnesia_config(args) -> AmnesiaConfig:
    if args is None:
        return AmnesiaConfig(output_dir="trainer_output")
    if isinstance(args, AmnesiaConfig):
        return args
    if isinstance(args, TrainingArguments):
        return AmnesiaConfig(**training_fields(args))
    raise ConfigError(f"args must be an AmnesiaConfig or TrainingArguments, got {type(args).__name__}.")


def is_causal_lm(model) -> bool:
    """Whether `model` (or a PEFT model's base) is a causal LM, whose position t predicts token t+1:
    its per-row losses shift the labels by one, as its own loss does."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith(("ForCausalLM", "LMHeadModel"))


__all__ = ["AmnesiacTrainer", "influence_holders", "last_complete_checkpoint"]

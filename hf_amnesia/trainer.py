"""`AmnesiacTrainer`: a `transformers.Trainer` that records per-sample deltas and can forget them.

Read top to bottom: construction and the refusals, what changes in training (ids in, recorder
driven around each microbatch and optimizer step, checkpoints), then `forget`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .attribution import open_tail_bound
from .calibrate import (
    CLASS_ACCURACY_TARGET,
    CLASS_RETRIES,
    HARM_RETRIES,
    NEIGHBOUR_ROWS,
    accuracy_points,
    forgotten_classes,
    largest_safe_scale,
    misfit_loss,
    repair_budget,
    repair_check_every,
    retained_sample,
    scale_ceiling,
    smallest_scale_reaching,
    unseen_targets,
    unsupported_by_neighbours,
)
from .config import (
    DEFAULT_KEEP_FRACTION,
    DEFAULT_KEEP_LAYOUT,
    DEFAULT_KEEP_SEED,
    DEFAULT_STORE_DTYPE,
    AmnesiaConfig,
)
from .data import dataset_ids, labels_of, select_rows, with_dataset_ids, without_ids
from .errors import (
    ConfigError,
    ForgetRequestError,
    StoreError,
    UnsupportedModelError,
    UnsupportedOptimizerError,
    UnsupportedTrainingError,
)
from .faults import crash_point
from .forget import ForgetReport, apply_update, forget_update, kept_share_weights, normalize_ids
from .layout import ParamLayout
from .recorder import Recorder
from .store import Manifest, StoreReader, folder_bytes, recording_marker
from .store.journal import (
    audit_record,
    commit,
    prepare,
    recover,
    roll_back,
    roll_forward,
    staging_dir,
    store_lock,
    weights_fingerprint,
)

try:  # datasets is a dependency, but the trainer also takes torch datasets
    import datasets
except ImportError:  # pragma: no cover
    datasets = None

logger = logging.get_logger(__name__)

RECORDER_STATE = "amnesia_recorder-{rank:05d}.safetensors"
FORGOTTEN_ATTR = "hf_amnesia_forgotten_ids"


class AmnesiacTrainer(Trainer):
    """Drop-in `Trainer` that records each training sample's exact Adam/AdamW delta.

    Args are those of `Trainer`; `args` may be `None`, a `TrainingArguments` or an
    `AmnesiaConfig`. With `record=False` it trains without recording (used for repair).
    """

    def __init__(self, model=None, args=None, train_dataset=None, *, record: bool = True, **kwargs):
        args = _as_amnesia_config(args)
        if model is not None:
            _refuse_unsupported_model(model)
        if args.gradient_checkpointing:
            raise UnsupportedTrainingError(
                "gradient_checkpointing=True re-runs the forward pass inside backward, which breaks the "
                "per-sample hooks. Set gradient_checkpointing=False (use a smaller batch to save memory)."
            )
        self._record = record
        self._recorder: Recorder | None = None
        self._resume_requested = False
        self._trained = False  # a recorded run finished on this trainer
        train_dataset = with_dataset_ids(train_dataset, args.id_column)
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or args.fsdp or args.deepspeed:
            raise UnsupportedTrainingError(
                "FSDP and DeepSpeed shard parameters and optimizer state, so per-sample deltas cannot be "
                "replayed exactly. Train with plain DDP (accelerate launch --multi_gpu) instead."
            )
        if args.n_gpu > 1:
            raise UnsupportedTrainingError(
                f"{args.n_gpu} GPUs in one process (torch DataParallel) are not supported; launch one "
                "process per GPU with `accelerate launch` or `torchrun`."
            )

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
        _refuse_unsupported_optimizer(optimizer)
        if self._record:
            self._start_recorder(optimizer)
        return optimizer

    def _start_recorder(self, optimizer: torch.optim.Optimizer) -> None:
        manifest = self._open_manifest()
        forgotten = set(self.forgotten_ids())
        need_ids = self.train_dataset is not None and (forgotten or self.args.sum_deltas_in_memory)
        train_ids = dataset_ids(self.train_dataset, self.args.id_column) if need_ids else None
        self._recorder = Recorder(
            self.model,
            optimizer,
            self.args.store_dir,
            manifest,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            tail_tolerance=self.args.tail_tolerance,
            sum_ids=train_ids if self.args.sum_deltas_in_memory else None,
        )
        if forgotten and self.train_dataset is not None:
            again = sorted(forgotten & set(train_ids.tolist()))
            if again:
                self._recorder.close()
                self._recorder = None
                raise UnsupportedTrainingError(
                    f"{len(again)} training rows have ids this model has forgotten (e.g. {again[:5]}); training on "
                    "them again would undo the forget. Remove those rows from train_dataset."
                )
        if not self._resume_requested:
            self._recorder.shard.begin()  # a resume goes back to its checkpoint's state instead
        ledger = self._recorder.ledger
        per_step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        tails = open_tail_bound(ledger.window, per_step, manifest.k, manifest.num_params)
        store = ""
        if self.train_dataset is not None and hasattr(self.train_dataset, "__len__"):
            size = len(self.train_dataset) * manifest.k * (4 if manifest.dtype == "float32" else 2)
            store = f"; the store of {len(self.train_dataset)} samples will take about {size / 2**20:.1f} MiB"
        logger.warning(
            f"hf_amnesia: recording {manifest.k} of {manifest.num_params} trainable entries per sample "
            f"(keep_fraction={manifest.keep_fraction}, {manifest.dtype}){store} in {self.args.store_dir}; "
            f"the open momentum tails ({ledger.window} steps of {per_step} samples) take up to "
            f"{tails / 2**20:.1f} MiB on {ledger.ledger.device} (docs/limits.md, Memory)"
            + (
                f"; the in-memory sums take {self._recorder.sums.values.numel() * 4 / 2**20:.1f} MiB there."
                if self._recorder.sums is not None
                else "."
            )
        )
        self._record_started = time.perf_counter()

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
        if self._record and self._trained:
            raise UnsupportedTrainingError(
                "train() already ran on this AmnesiacTrainer: its optimizer still holds that run's Adam "
                "momentum, which would keep moving the weights without being attributed to any sample. "
                "Continue training with a new AmnesiacTrainer on this model and store (its optimizer "
                "starts fresh; the store accepts a run that starts from the weights the last one ended with)."
            )
        self._resume_requested = resume_from_checkpoint not in (None, False)
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
            if self._recorder is not None:
                self._finish_recording()
                self._trained = True
        finally:
            if self._recorder is not None:
                self._recorder.close()
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
            manifest.final_weights = weights_fingerprint(manifest.layout.params_of(self.model))
            manifest.save(Path(self.args.store_dir))
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
        if checkpoint is not None and self._recorder is not None:
            path = Path(checkpoint) / RECORDER_STATE.format(rank=self.accelerator.process_index)
            if not path.exists():
                raise StoreError(
                    f"{checkpoint} holds no hf_amnesia recorder state ({path.name}); it was not written by an "
                    "AmnesiacTrainer with the same number of processes. Resume from a checkpoint of the recording run."
                )
            self._recorder.load_state_dict(load_file(str(path)))

    # -- the store -------------------------------------------------------------------------------

    def _open_manifest(self) -> Manifest:
        """The store's manifest (made from the config when there is no store yet), saved for this run."""
        args = self.args
        store_dir = Path(args.store_dir)
        layout = ParamLayout.from_model(self.model)
        if layout.num_params == 0:
            raise UnsupportedModelError("the model has no trainable parameters; nothing can be recorded.")
        existing = Manifest.load(store_dir)
        if existing is not None:
            if existing.layout.fingerprint() != layout.fingerprint():
                raise StoreError(
                    f"the store at {store_dir} was recorded for another model or set of trainable parameters "
                    f"({existing.num_params} entries, layout {existing.layout.fingerprint()[:12]}) than this one "
                    f"({layout.num_params} entries, layout {layout.fingerprint()[:12]}). Use that model, or a new store_dir."
                )
            for name, mine, theirs in (
                ("keep_fraction", args.keep_fraction, existing.keep_fraction),
                ("store_dtype", args.store_dtype, existing.dtype),
                ("keep_seed", args.keep_seed, existing.seed),
                ("keep_layout", args.keep_layout, existing.keep_layout),
            ):
                if mine is not None and mine != theirs:
                    raise ConfigError(
                        f"{name}={mine!r} conflicts with the existing store at {store_dir}, which fixes "
                        f"{name}={theirs!r}. Leave {name} unset to use the store's value, or use a new store_dir."
                    )
            if (
                existing.final_weights is not None
                and not self._resume_requested
                and existing.final_weights != weights_fingerprint(layout.params_of(self.model))
            ):
                raise StoreError(
                    f"the store at {store_dir} holds the records of a training run that ended with other weights "
                    "than this model's: recording another run into it would mix the two runs' deltas. Use a new "
                    "store_dir (or output_dir) for a new run, or delete that store; to train the recorded model "
                    "further, load the weights it ended with."
                )
            manifest = existing
        else:
            manifest = Manifest(
                layout=layout,
                keep_fraction=float(args.keep_fraction or DEFAULT_KEEP_FRACTION),
                dtype=args.store_dtype or DEFAULT_STORE_DTYPE,
                seed=int(args.keep_seed if args.keep_seed is not None else DEFAULT_KEEP_SEED),
                keep_layout=args.keep_layout or DEFAULT_KEEP_LAYOUT,
            )
        manifest.num_shards = max(manifest.num_shards, self.accelerator.num_processes)
        if self.accelerator.is_main_process:
            try:
                store_dir.mkdir(parents=True, exist_ok=True)
                os.chmod(store_dir, 0o700)
                manifest.save(store_dir)
            except OSError as err:
                raise StoreError(f"cannot write the store at {store_dir}: {err}. Choose a writable store_dir.") from err
        self.accelerator.wait_for_everyone()
        marker = recording_marker(store_dir, self.accelerator.process_index)
        if marker.exists() and not self._resume_requested:
            raise StoreError(
                f"the store at {store_dir} holds records of a training run that did not finish. Resume that run with "
                "trainer.train(resume_from_checkpoint=...), or start over with a new store_dir."
            )
        return manifest

    # -- forgetting ------------------------------------------------------------------------------

    def forget(
        self,
        dataset_ids,
        *,
        scale: float | str = "auto",
        repair_steps: int | str = "auto",
        holdout=None,
        whole_class: bool | None = None,
        max_harm: float = 40.0,
        strict: bool = False,
        save_to: str | os.PathLike | None = None,
        purge: bool = True,
    ) -> ForgetReport:
        """Subtract the stored deltas of `dataset_ids` from the model; optionally repair and commit.

        `forget(ids, scale=1.0, repair_steps=0)` is the exact subtraction of what those samples
        contributed to training, and needs no data. Ids already forgotten by this model are
        skipped; ids the store does not hold are reported in `unknown` (or raise with
        `strict=True`, before any change).

        With the defaults (`scale="auto"`, `repair_steps="auto"`) each tensor's stored sum is first
        weighted by the inverse of the share of its rows a sample keeps (`kept_share_weights`; 1 in
        the `entries` layout), and the scale is the largest whose weighted
        subtraction costs at most `max_harm` accuracy points on `holdout` (default: the trainer's
        `eval_dataset`; rows never trained on, not the test data you report), counted on the
        classes the request keeps; then the model is fine-tuned on the retained training rows
        until their accuracy is back at the original's level (at most a tenth of the training's
        steps; for a whole class, all of them), holding the forget rows unseen unless whole
        classes go: no forget row may fit better than the held-out row of its rank, nor than the
        subtraction left it (so this repair needs `holdout` too). A request holding every
        training row of a label removes that class; this is detected from the labels, or stated
        with `whole_class=True/False`. An integer `repair_steps` fine-tunes for exactly that many
        steps.

        Without `save_to` only the weights in memory change (e.g. to compare methods on copies).
        With `save_to=DIR` the request is one transaction under the store's lock: the model is
        saved to DIR, and (with `purge=True`) the forgotten ids' rows are erased from the store,
        and an audit record is appended; a crash leaves both fully before or fully after.
        """
        began = time.perf_counter()
        ids = normalize_ids(dataset_ids)
        if scale != "auto" and (
            isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale)
        ):
            raise ForgetRequestError(f'scale must be "auto" or a finite number, got {scale!r}.')
        if repair_steps != "auto" and (
            not isinstance(repair_steps, (int, np.integer)) or isinstance(repair_steps, bool) or repair_steps < 0
        ):
            raise ForgetRequestError(f'repair_steps must be "auto" or a non-negative integer, got {repair_steps!r}.')
        if isinstance(max_harm, bool) or not isinstance(max_harm, (int, float)) or not 0 <= max_harm < 100:
            raise ForgetRequestError(f"max_harm must be a number of accuracy points in [0, 100), got {max_harm!r}.")
        if repair_steps and self.train_dataset is None:
            raise ForgetRequestError(
                "repairing fine-tunes on the retained training data, but this trainer has no train_dataset. "
                "Pass train_dataset=... to the trainer, or call forget(ids, scale=1.0, repair_steps=0) for the "
                "exact subtraction, which needs no data."
            )
        store_dir = Path(self.args.store_dir)
        if save_to is not None:
            target = Path(save_to).resolve()
            if target == store_dir.resolve() or store_dir.resolve() in target.parents or target.is_file():
                raise ForgetRequestError(
                    f"save_to={str(save_to)!r} must be a folder outside the store {store_dir} (the model is saved "
                    "there and replaces what it holds)."
                )
        if store_dir.exists() and not store_dir.is_dir():
            raise StoreError(f"store_dir {store_dir} is a file, not a store folder; point it at the store folder.")
        auto = None
        if scale == "auto" or repair_steps == "auto":
            auto = self._auto_data(
                ids, holdout, whole_class, need_holdout=scale == "auto", hold_unseen=repair_steps == "auto"
            )
        main = self.accelerator.is_main_process
        locked = store_lock(store_dir) if (save_to is not None and main and store_dir.is_dir()) else nullcontext()
        with locked:
            if save_to is not None and main and store_dir.is_dir():
                recover(store_dir)
            self.accelerator.wait_for_everyone()
            report = self._forget_locked(ids, scale, repair_steps, strict, save_to, purge, auto, float(max_harm))
            self.accelerator.wait_for_everyone()
        report.seconds = time.perf_counter() - began
        return report

    def _forget_locked(self, ids, scale, repair_steps, strict, save_to, purge, auto, max_harm) -> ForgetReport:
        reader = StoreReader(self.args.store_dir)
        store_dir = Path(self.args.store_dir)
        layout = ParamLayout.from_model(self.model)
        if reader.manifest.layout.fingerprint() != layout.fingerprint():
            raise StoreError(
                f"the store at {store_dir} belongs to another model or set of trainable parameters; "
                "load the model the store was recorded for."
            )
        if save_to is not None and any(
            recording_marker(store_dir, r).exists() for r in range(reader.manifest.num_shards)
        ):
            raise StoreError(
                f"a training run is recording into {store_dir} (or one was interrupted); commit forget requests "
                "after it finished, or resume it first."
            )
        done = set(self.forgotten_ids())
        if save_to is not None:
            _refuse_stale_model(Path(save_to), done)
        already = [i for i in ids.tolist() if i in done]
        unknown = [i for i in ids.tolist() if i not in done and not reader.locate(i)]
        if strict and unknown:
            raise ForgetRequestError(
                f"{len(unknown)} ids are not in the store (e.g. {unknown[:5]}); nothing was changed. "
                "Drop them or call forget(..., strict=False) to skip them."
            )
        skip = done | set(unknown)
        todo = np.array([i for i in ids.tolist() if i not in skip], dtype=np.int64)
        params = layout.params_of(self.model)
        snapshot = [p.detach().clone() for p in params]
        before = weights_fingerprint(params) if save_to is not None else None
        update = forget_update(reader, todo)
        if scale == "auto":  # every tensor at the same share of its estimated whole change
            update = update * kept_share_weights(reader.manifest)
        committed = False
        if repair_steps == "auto":
            auto.original_accuracy = self._accuracy(auto.retained_sample)
            self._prepare_unseen_hold(auto, todo)
        try:
            scale, repair_steps, trace = self._subtract_and_repair(
                params, snapshot, update, todo, done, scale, repair_steps, auto, max_harm, reader.manifest.keep_fraction
            )
            report = ForgetReport(
                forgotten=todo.tolist(),
                already_forgotten=already,
                unknown=unknown,
                delta_norm=scale * float(update.norm()),
                scale=scale,
                repair_steps=int(repair_steps),
                calibration=trace,
            )
            if save_to is not None:
                staging = staging_dir(save_to)
                if main_process := self.accelerator.is_main_process:
                    roll_back(Path(save_to))
                self.accelerator.wait_for_everyone()
                self.save_model(str(staging))
                self.accelerator.wait_for_everyone()
                if main_process:
                    purged = np.array(sorted(i for i in done | set(todo.tolist()) if reader.locate(i)), dtype=np.int64)
                    audit = audit_record(
                        ids,
                        report.forgotten,
                        already,
                        unknown,
                        report.delta_norm,
                        scale,
                        repair_steps,
                        before,
                        weights_fingerprint(params),
                        save_to,
                        purge,
                    )
                    entry = prepare(Path(save_to), purged if purge else None, audit)
                    crash_point("forget:staged")
                    commit(store_dir, entry)
                    committed = True
                    crash_point("forget:committed")
                    roll_forward(store_dir, entry, crash_at=crash_point)  # the store's model is now the saved one
                    report.request = audit["request"]
                report.committed = True
        except BaseException:
            if not committed:
                _restore(params, snapshot)
                self._set_forgotten(sorted(done))
                if save_to is not None and self.accelerator.is_main_process:
                    roll_back(Path(save_to))
            raise
        return report

    def _subtract_and_repair(
        self, params, snapshot, update, todo, done, scale, repair_steps, auto, max_harm, keep_fraction
    ) -> tuple[float, int, list[tuple[float, float]]]:
        """Subtract `update` (at the automatic scale, or the given one) and repair. Returns the scale,
        the repair steps and the scale choice's trace.

        With both choices automatic, a subtraction the bounded repair cannot mend is undone and tried
        again from the original weights with half the harm budget, at most HARM_RETRIES times; a halved
        budget that gives no smaller scale is skipped, as it would repeat the same attempt. When an
        attempt brings a removed class back and an earlier (unmended) attempt kept it forgotten, the
        search stops there and keeps the latest such attempt: smaller scales only leave more of
        the class. When a mended attempt brings the class back, `_push_class_out` tries larger
        scales."""
        trace: list[tuple[float, float]] = []
        both_auto = scale == "auto" and repair_steps == "auto" and len(todo) > 0
        limits = [max_harm / 2**k for k in range(HARM_RETRIES + 1)] if both_auto else [max_harm]
        failed = None  # (scale, repair steps, weights, class accuracy or None) of the last attempt whose repair failed
        kept = None  # the same, of the last failed attempt that kept the removed classes forgotten
        for attempt, limit in enumerate(limits):
            last = attempt == len(limits) - 1
            _restore(params, snapshot)
            chosen = scale
            if scale == "auto":
                choice = self._choose_scale(params, snapshot, update, auto, limit, keep_fraction)
                chosen = choice.scale
                trace.extend(choice.trace)
            chosen = float(chosen)
            if failed is not None and chosen >= failed[0]:  # no smaller scale (e.g. the ceiling, or a class's
                if not last:  # fallback scale): no need to repeat that attempt
                    continue
                _restore(params, failed[2])
                logger.warning(
                    "forget: no smaller max_harm gave a smaller scale; the model keeps the attempt at scale "
                    "%.3g, whose repair did not bring retained accuracy back. Check it on held-out data.",
                    failed[0],
                )
                self._warn_if_class_is_back(auto, failed[3], failed[1])  # measured on these weights
                return failed[0], int(failed[1]), trace
            self._subtract(params, snapshot, update, chosen, auto)
            self._set_forgotten(sorted(done | set(todo.tolist())))
            steps, restored = repair_steps, True
            if repair_steps == "auto":
                steps, restored = self._repair_until_restored(auto) if len(todo) else (0, True)
            elif repair_steps:
                self._repair(int(repair_steps))
            recognised = self._recognised_class(auto, steps)
            if _class_back(recognised) and kept is not None:
                _restore(params, kept[2])
                logger.warning(
                    "forget: the repair at scale %.3g brought the removed class back (%.1f %% of its sampled "
                    "training rows classified correctly); the model keeps the earlier attempt at scale %.3g, "
                    "which kept the class forgotten but whose repair did not bring retained accuracy back. "
                    "Check it on held-out data.",
                    chosen,
                    recognised,
                    kept[0],
                )
                return kept[0], int(kept[1]), trace
            if restored or last:
                if not restored:
                    logger.warning(
                        "forget: the repair did not bring retained accuracy back within its budget; the model "
                        "keeps the last attempt (scale %.3g). Check it on held-out data, or call forget again "
                        "on the original weights with a smaller max_harm or a fixed repair_steps.",
                        chosen,
                    )
                elif both_auto and _class_back(recognised):
                    return self._push_class_out(
                        params, snapshot, update, chosen, steps, recognised, auto, keep_fraction, trace
                    )
                self._warn_if_class_is_back(auto, recognised, steps)
                return chosen, int(steps), trace
            failed = (chosen, steps, [p.detach().clone() for p in params], recognised)
            if not _class_back(recognised):
                kept = failed
            logger.warning(
                "forget: the repair did not bring retained accuracy back within its budget at scale %.3g "
                "(max_harm %.3g); trying again from the original weights with max_harm %.3g.",
                chosen,
                limit,
                limits[attempt + 1],
            )
        raise AssertionError("unreachable: the last attempt always returns")

    def _subtract(self, params, snapshot, update, scale: float, auto: _AutoData | None) -> None:
        """The original weights (`snapshot`) minus `scale * update`, and the forget rows' losses right
        after it, where the repair holds them (the cap of `unseen_targets`)."""
        _restore(params, snapshot)
        apply_update(params, update, scale)
        if auto is not None and auto.forget_rows is not None:
            auto.after_subtraction = self._row_losses(auto.forget_rows)

    def _push_class_out(self, params, snapshot, update, scale, steps, recognised, auto, keep_fraction, trace):
        """The repair brought retained accuracy back, and a removed class with it. Try again from the
        original weights at twice the scale, at most CLASS_RETRIES times and never above the ceiling,
        and keep the first attempt that leaves the class forgotten (warned if its repair did not bring
        retained accuracy back); if none does, keep the first attempt, warned. Returns as
        `_subtract_and_repair` does."""
        first = (scale, steps, [p.detach().clone() for p in params], recognised)
        ceiling = scale_ceiling(keep_fraction)
        for _ in range(CLASS_RETRIES):
            if scale >= ceiling:
                break
            scale = min(2.0 * scale, ceiling)
            logger.warning(
                "forget: the repair brought the removed class back (%.1f %% of its sampled training rows "
                "classified correctly); trying again from the original weights at scale %.3g.",
                recognised,
                scale,
            )
            self._subtract(params, snapshot, update, scale, auto)
            steps, restored = self._repair_until_restored(auto)
            recognised = self._recognised_class(auto, steps)
            if not _class_back(recognised):
                if not restored:
                    logger.warning(
                        "forget: the model keeps the attempt at scale %.3g, which keeps the class forgotten but "
                        "whose repair did not bring retained accuracy back. Check it on held-out data.",
                        scale,
                    )
                return scale, int(steps), trace
        _restore(params, first[2])
        self._warn_if_class_is_back(auto, first[3], first[1])
        return first[0], int(first[1]), trace

    def _recognised_class(self, auto: _AutoData | None, repair_steps) -> float | None:
        """Accuracy (%) on the removed classes' sampled training rows after a repair; None when no
        class goes or nothing was repaired. The scale is checked to make a removed class
        unrecognisable before the repair; the repair trains on the other classes only, but may
        restore enough shared features to bring the class back."""
        if auto is None or auto.class_rows is None or not repair_steps:
            return None
        return self._accuracy(auto.class_rows)

    def _warn_if_class_is_back(self, auto: _AutoData | None, recognised: float | None, repair_steps) -> None:
        if _class_back(recognised):
            logger.warning(
                "forget: after %d repair steps the model classifies %.1f %% of the removed class's training rows "
                "(a sample of %d) correctly again, more than %g %%: the class is not forgotten. Call forget again "
                "on the original weights with a larger scale (e.g. twice the reported one) or fewer repair_steps, "
                "and check the result.",
                int(repair_steps),
                recognised,
                len(auto.class_rows),
                CLASS_ACCURACY_TARGET,
            )

    def forgotten_ids(self) -> list[int]:
        """Ids this model has already forgotten (saved with the model's config)."""
        holder = getattr(self.model, "config", self.model)
        return list(getattr(holder, FORGOTTEN_ATTR, []) or [])

    def _set_forgotten(self, ids: list[int]) -> None:
        holder = getattr(self.model, "config", self.model)
        setattr(holder, FORGOTTEN_ATTR, [int(i) for i in ids])

    def _repair(self, steps: int) -> None:
        retained = without_ids(self.train_dataset, self.args.id_column, set(self.forgotten_ids()))
        finetune(self.model, retained, steps, self.args, data_collator=self.data_collator)

    # -- the automatic scale and repair (hf_amnesia/calibrate.py) --------------------------------

    def _auto_data(
        self, ids: np.ndarray, holdout, whole_class: bool | None, need_holdout: bool, hold_unseen: bool = False
    ) -> _AutoData:
        """Check, before anything changes, that the automatic choice has the data it needs: the
        holdout for the automatic scale (`need_holdout`), and for the automatic repair of a
        request that removes no whole class (`hold_unseen`)."""
        fix = "or call forget(ids, scale=1.0, repair_steps=0) for the exact subtraction, which needs no data"
        if self.train_dataset is None:
            raise ForgetRequestError(
                "the automatic scale and repair need the retained training rows, but this trainer has no "
                f"train_dataset. Pass train_dataset=... to the trainer, {fix}."
            )
        train_ids = dataset_ids(self.train_dataset, self.args.id_column)
        train_labels = labels_of(self.train_dataset)
        if train_labels is None:
            raise ForgetRequestError(
                "the automatic scale and repair measure classification accuracy, but the training rows have "
                f"no `labels` or `label` column of one class per row; {fix}, with your own scale."
            )
        requested = np.isin(train_ids, np.union1d(ids, np.asarray(self.forgotten_ids(), dtype=np.int64)))
        if requested.all():
            raise ForgetRequestError(f"the request leaves no training row to repair on; {fix}.")
        classes = forgotten_classes(train_labels, requested)
        if whole_class is True and not classes:
            raise ForgetRequestError(
                "whole_class=True, but the request (with what this model already forgot) does not hold every "
                "training row of any label. Request all rows of the class, e.g. ids_of_label(...)."
            )
        if whole_class is False:
            classes = []
        retained = without_ids(self.train_dataset, self.args.id_column, set(train_ids[requested].tolist()))
        data = _AutoData(
            classes=classes,
            retained=retained,
            retained_sample=select_rows(retained, retained_sample(len(retained), self.args.seed)),
            planned_steps=self._planned_training_steps(),
        )
        if classes:  # the removed classes' training rows: a class request must stop predicting them
            rows = np.flatnonzero(np.isin(train_labels, classes))
            data.class_rows = select_rows(self.train_dataset, rows[retained_sample(len(rows), self.args.seed)])
        if need_holdout or (hold_unseen and not classes):
            holdout = self.eval_dataset if holdout is None else holdout
            if holdout is None or isinstance(holdout, dict):
                what = "a dict of eval datasets" if isinstance(holdout, dict) else "no held-out data"
                needs = 'scale="auto"' if need_holdout else 'repair_steps="auto"'
                raise ForgetRequestError(
                    f"{needs} measures held-out rows, but got {what}. Pass holdout=<a split "
                    "never trained on and not your test split> (or eval_dataset=... to the trainer), "
                    f"{fix}."
                )
            holdout_labels = labels_of(holdout)
            if holdout_labels is None:
                raise ForgetRequestError(f"the holdout rows have no `labels` or `label` column; {fix}.")
            kept = np.flatnonzero(~np.isin(holdout_labels, classes))
            if len(kept) == 0:
                raise ForgetRequestError(
                    f"the holdout has no rows of the classes the request keeps; add such rows, {fix}."
                )
            data.holdout = select_rows(holdout, kept)
        return data

    def _planned_training_steps(self) -> int:
        args = self.args
        if args.max_steps and args.max_steps > 0:
            return int(args.max_steps)
        per_step = args.per_device_train_batch_size * self.accelerator.num_processes * args.gradient_accumulation_steps
        steps_per_epoch = math.ceil(len(self.train_dataset) / per_step)
        return math.ceil(steps_per_epoch * args.num_train_epochs)

    @torch.no_grad()
    def _predict(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of every row of `dataset` (in eval mode; the same on every process).
        The automatic choice reads data only through here."""
        model = self.model
        was_training = model.training
        model.eval()
        loader = DataLoader(
            self._model_rows(dataset), batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator
        )
        logits, labels = zip(*(_logits_and_labels(model, batch, self.args.id_column) for batch in loader))
        model.train(was_training)
        return torch.cat(logits).float().cpu(), torch.cat(labels).cpu()

    def _model_rows(self, dataset):
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            return self._remove_unused_columns(dataset, description="forget")
        return dataset

    def _accuracy(self, dataset) -> float:
        """Top-1 accuracy (percent) of the model on `dataset`."""
        logits, labels = self._predict(dataset)
        return accuracy_points(logits.argmax(-1).numpy(), labels.numpy())

    def _row_losses(self, dataset) -> np.ndarray:
        """Cross-entropy of each row of `dataset` under the model."""
        logits, labels = self._predict(dataset)
        return nn.functional.cross_entropy(logits, labels.long(), reduction="none").double().numpy()

    def _prepare_unseen_hold(self, auto: _AutoData, todo: np.ndarray) -> None:
        """Unless whole classes go, the automatic repair holds the forget rows unseen
        (`calibrate.unseen_targets`): it needs the request's rows, the original's held-out losses, and
        which forget rows their nearest retained rows do not support (`unsupported_by_neighbours`,
        on the original's features)."""
        if auto.classes or auto.holdout is None or not len(todo):
            return
        rows = np.flatnonzero(np.isin(dataset_ids(self.train_dataset, self.args.id_column), todo))
        auto.forget_rows = select_rows(self.train_dataset, rows)
        logits, held_labels = self._predict(auto.holdout)  # one pass: the losses and which rows it gets wrong
        losses = nn.functional.cross_entropy(logits, held_labels.long(), reduction="none").double().numpy()
        auto.held_out_losses = np.sort(losses)
        auto.misfit_loss = misfit_loss(losses, logits.argmax(-1).numpy() == held_labels.numpy())
        features, labels = self._features(auto.forget_rows)
        neighbours = select_rows(auto.retained, retained_sample(len(auto.retained), self.args.seed, NEIGHBOUR_ROWS))
        retained_features, retained_labels = self._features(neighbours)
        if features is None or retained_features is None:
            logger.warning(
                "forget: the model's classifier layer (its last nn.Linear) does not take one feature vector "
                "per row, so the repair cannot tell which forget rows the retained data does not support; "
                "it holds them at held-out losses only."
            )
            return
        auto.unsupported = unsupported_by_neighbours(features, labels, retained_features, retained_labels)

    def _features(self, dataset) -> tuple[np.ndarray | None, np.ndarray]:
        """Each row's input to the model's classifier layer (its last nn.Linear), and the labels;
        None instead of the features when that input is not one vector per row."""
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            return None, labels_of(dataset)
        captured: list[torch.Tensor] = []
        hook = linears[-1].register_forward_hook(lambda module, args, out: captured.append(args[0].detach()))
        try:
            logits, labels = self._predict(dataset)
        finally:
            hook.remove()
        if any(c.dim() != 2 for c in captured) or sum(len(c) for c in captured) != len(labels):
            return None, labels.numpy()
        return torch.cat(captured).float().cpu().numpy(), labels.numpy()

    def _choose_scale(self, params, snapshot, update, auto: _AutoData, max_harm: float, keep_fraction: float):
        """Try scales on the live weights (each try starts from `snapshot`); leaves the last one tried."""
        base = self._accuracy(auto.holdout)

        def accuracy_at(scale: float, rows) -> float:
            _restore(params, snapshot)
            apply_update(params, update, scale)
            return self._accuracy(rows)

        def harm(scale: float) -> float:
            return base - accuracy_at(scale, auto.holdout)

        ceiling = scale_ceiling(keep_fraction)
        choice = largest_safe_scale(harm, max_harm, ceiling)
        if auto.class_rows is None:
            return choice

        def class_accuracy(scale: float) -> float:
            return accuracy_at(scale, auto.class_rows)

        # A removed class must be forgotten (Retrain cannot predict it): if the harmless scale
        # leaves it recognisable, take the smallest scale that does not, and let the repair mend.
        reached = smallest_scale_reaching(class_accuracy, CLASS_ACCURACY_TARGET, choice.scale, ceiling)
        choice.trace.extend(reached.trace)
        choice.scale = max(choice.scale, reached.scale)
        return choice

    def _repair_until_restored(self, auto: _AutoData, trainer_class=None) -> tuple[int, bool]:
        """Fine-tune on the retained rows until their accuracy is back at the original's, holding
        the forget rows unseen where `_prepare_unseen_hold` set that up (`trainer_class` replaces
        the fine-tune's trainer). When whole classes go, the repair runs its whole budget: stopped at
        the original's level, class requests ended further from Retrain (docs/results.md, "A whole
        class's repair runs its whole budget"). Returns (steps taken, whether it is back)."""
        target = auto.original_accuracy - 100.0 / len(auto.retained_sample)  # one row of slack

        def restored() -> bool:
            return self._accuracy(auto.retained_sample) >= target

        if not auto.classes and restored():
            return 0, True
        budget = repair_budget(auto.planned_steps)
        if trainer_class is None and auto.forget_rows is not None:
            trainer_class = functools.partial(_HoldingUnseen, unseen=auto)
        steps = finetune(
            self.model,
            auto.retained,
            budget,
            self.args,
            data_collator=self.data_collator,
            trainer_class=trainer_class,
            stop_when=None if auto.classes else restored,
            check_every=repair_check_every(budget),
        )
        return steps, steps < budget or restored()


@dataclasses.dataclass
class _AutoData:
    """What the automatic scale and repair measure on (checked before a request changes anything)."""

    classes: list[int]
    retained: object
    retained_sample: object
    planned_steps: int
    holdout: object = None
    original_accuracy: float = float("nan")  # on retained_sample, before the subtraction
    class_rows: object = None  # a sample of the removed classes' training rows
    forget_rows: object = None  # the request's training rows, held unseen by the repair
    held_out_losses: np.ndarray | None = None  # the original's losses on the holdout, sorted
    after_subtraction: np.ndarray | None = None  # the losses of forget_rows right after the subtraction
    unsupported: np.ndarray | None = None  # forget rows whose label their retained neighbours outvote
    misfit_loss: float = 0.0  # the original's median loss on the held-out rows it misclassifies


class _HoldingUnseen(AmnesiacTrainer):
    """The repair's trainer when it holds the forget rows unseen: the retained rows' loss plus, on a
    batch of forget rows, mean(relu(target_i - loss_i)) with `calibrate.unseen_targets` (rows the
    retained data does not support held at least at a misclassified held-out row's loss)."""

    def __init__(self, *args, unseen: _AutoData, **kwargs):
        super().__init__(*args, **kwargs)
        self.unseen = unseen
        self.forget_rows = self._model_rows(unseen.forget_rows)
        self.order = torch.Generator().manual_seed(self.args.seed)
        self.queue: list[int] = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        if len(self.queue) < self.args.per_device_train_batch_size:  # the forget rows in a seeded order
            self.queue += torch.randperm(len(self.forget_rows), generator=self.order).tolist()
        picked, self.queue = (
            self.queue[: self.args.per_device_train_batch_size],
            self.queue[self.args.per_device_train_batch_size :],
        )
        batch = self.data_collator([self.forget_rows[i] for i in picked])
        # the same rows on every process, so the unwrapped model (no gradient sync of its own) serves
        logits, labels = _logits_and_labels(self.accelerator.unwrap_model(model), batch, self.args.id_column)
        losses = nn.functional.cross_entropy(logits.float(), labels.long().to(logits.device), reduction="none")
        unsupported = None if self.unseen.unsupported is None else self.unseen.unsupported[picked]
        targets = unseen_targets(
            losses.detach().cpu().numpy(),
            self.unseen.after_subtraction[picked],
            self.unseen.held_out_losses,
            unsupported,
            self.unseen.misfit_loss,
        )
        loss = loss + torch.relu(torch.as_tensor(targets, dtype=losses.dtype, device=losses.device) - losses).mean()
        return (loss, out[1]) if return_outputs else loss


def _class_back(recognised: float | None) -> bool:
    """Whether a removed class is recognisable again (`_recognised_class`'s accuracy above target)."""
    return recognised is not None and recognised > CLASS_ACCURACY_TARGET


def _logits_and_labels(model: nn.Module, batch, id_column: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits on a collated batch, and the batch's labels (`labels` or `label`)."""
    batch = dict(batch)
    batch.pop(id_column, None)
    target = batch.pop("labels", None)
    target = batch.pop("label", None) if target is None else target
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    if isinstance(out, dict) or hasattr(out, "keys"):
        logits = out["logits"]
    else:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits, torch.as_tensor(target)


@torch.no_grad()
def _restore(params: list[torch.Tensor], snapshot: list[torch.Tensor]) -> None:
    for param, old in zip(params, snapshot):
        param.copy_(old)


def finetune(
    model: nn.Module,
    train_dataset,
    steps: int,
    args: TrainingArguments,
    data_collator=None,
    trainer_class=None,
    stop_when=None,
    check_every: int = 1,
) -> int:
    """Train `model` in place for `steps` optimizer steps at a constant learning rate, unrecorded.

    This is the repair step of `forget` (on the retained rows), and the fine-tune baseline. With
    `stop_when`, training stops early once it returns True (checked every `check_every` steps).
    Returns the number of steps taken.
    """
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    with tempfile.TemporaryDirectory() as tmp:
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
            store_dir=os.path.join(tmp, "_unused"),
            disable_tqdm=True,
            load_best_model_at_end=False,
        )
        trainer_class = trainer_class or AmnesiacTrainer
        trainer = trainer_class(
            model=model,
            args=AmnesiaConfig(**fields),
            train_dataset=train_dataset,
            data_collator=data_collator,
            record=False,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        if stop_when is not None:
            trainer.add_callback(_StopWhen(stop_when, check_every))
        trainer.train()
        return int(trainer.state.global_step)


class _StopWhen(TrainerCallback):
    def __init__(self, done, every: int):
        self.done, self.every = done, every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and self.done():
            control.should_training_stop = True


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


def _refuse_stale_model(save_to: Path, forgotten: set[int]) -> None:
    """A model saved at `save_to` that forgot more than the one in memory must not be overwritten."""
    config = save_to / "config.json"
    if not config.exists():
        return
    saved = set(json.loads(config.read_text()).get(FORGOTTEN_ATTR) or [])
    if not saved <= forgotten:
        raise ForgetRequestError(
            f"the model saved at {save_to} has already forgotten ids this model in memory has not "
            f"(e.g. {sorted(saved - forgotten)[:5]}): it is newer. Load the model from {save_to} and retry."
        )


def _as_amnesia_config(args) -> AmnesiaConfig:
    if args is None:
        return AmnesiaConfig(output_dir="trainer_output")
    if isinstance(args, AmnesiaConfig):
        return args
    if isinstance(args, TrainingArguments):
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
        return AmnesiaConfig(**values)
    raise ConfigError(f"args must be an AmnesiaConfig or TrainingArguments, got {type(args).__name__}.")


def _refuse_unsupported_model(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise UnsupportedModelError(
                f"{name or 'model'} is a {type(module).__name__}: batch statistics mix samples, so per-sample "
                "deltas are not defined. Replace it with GroupNorm, e.g. "
                "`model = opacus.validators.ModuleValidator.fix(model)`."
            )


def _refuse_unsupported_optimizer(optimizer: torch.optim.Optimizer) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    if type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
        raise UnsupportedOptimizerError(
            f"{type(inner).__name__} is not supported: exact per-sample deltas are derived for torch Adam and "
            "AdamW only. Use optim='adamw_torch' (the default) or pass a torch.optim.AdamW."
        )
    for group in inner.param_groups:
        if group.get("amsgrad") or group.get("maximize"):
            raise UnsupportedOptimizerError("Adam/AdamW with amsgrad or maximize is not supported; turn them off.")
        if type(inner) is torch.optim.Adam and group["weight_decay"] and not group.get("decoupled_weight_decay"):
            raise UnsupportedOptimizerError(
                "torch Adam with weight_decay > 0 adds an L2 term to the gradient that cannot be split per "
                "sample. Use AdamW (decoupled decay) or weight_decay=0."
            )

"""Serving one forget request, top to bottom: check it, subtract and repair, commit it.

`serve` takes the request's ids and the training side's `ForgetContext` (built by the trainer):

1. check everything before anything changes (ids, choices, `save_to`, the data the automatic
   choice needs, the store and the model it serves);
2. sum the stored deltas of the new ids (`subtraction.forget_update`), let `ForgetPolicy` choose
   and apply the subtraction and repair (`attempts.ModelAttempts` does the work);
3. with `save_to`, commit under the store's lock as one transaction (`store.journal`): the model
   saved, the ids' rows purged, an audit record appended, all or nothing. On any error before the
   commit point the weights and the forgotten-id record go back to what they were.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ..config import AmnesiaConfig
from ..data import without_ids
from ..errors import ForgetRequestError, StoreError
from ..faults import crash_point
from ..layout import ParamLayout
from ..store import StoreReader, recording_marker
from ..store.audit import check_audit
from ..store.journal import (
    audit_record,
    commit,
    load_key,
    prepare,
    recover,
    roll_back,
    roll_forward,
    staging_dir,
    store_lock,
    weights_fingerprint,
)
from .attempts import ModelAttempts
from .config import ForgetConfig
from .measure import Measurer
from .policy import ForgetPolicy
from .prepare import gather, prepare_unseen_hold
from .repair import finetune
from .request import ForgetReport, check_choices, forgotten_ids, normalize_ids, refuse_stale_model, set_forgotten
from .subtraction import forget_update, kept_share_weights

logger = logging.getLogger(__name__)


@dataclass
class ForgetContext:
    """What a forget request needs from the training side."""

    model: nn.Module
    args: AmnesiaConfig
    train_dataset: object
    eval_dataset: object
    measure: Measurer
    planned_steps: Callable[[], int]  # the training's optimizer steps
    save_model: Callable[[str], None]
    is_main_process: bool
    wait_for_everyone: Callable[[], None]


def serve(
    context: ForgetContext,
    dataset_ids,
    *,
    config: ForgetConfig | None,
    scale: float | str,
    repair_steps: int | str,
    holdout,
    whole_class: bool | None,
    strict: bool,
    save_to,
    purge: bool,
) -> ForgetReport:
    """`AmnesiacTrainer.forget` (its docstring says what each argument does)."""
    began = time.perf_counter()
    ids = normalize_ids(dataset_ids)
    config = ForgetConfig() if config is None else config
    if not isinstance(config, ForgetConfig):
        raise ForgetRequestError(f"config must be a ForgetConfig, got {type(config).__name__}.")
    check_choices(scale, repair_steps)
    if repair_steps and context.train_dataset is None:
        raise ForgetRequestError(
            "repairing fine-tunes on the retained training data, but this trainer has no train_dataset. "
            "Pass train_dataset=... to the trainer, or call forget(ids, scale=1.0, repair_steps=0) for the "
            "exact subtraction, which needs no data."
        )
    store_dir = Path(context.args.store_dir)
    if save_to is not None:
        target = Path(save_to).resolve()
        if target == store_dir.resolve() or store_dir.resolve() in target.parents or target.is_file():
            raise ForgetRequestError(
                f"save_to={str(save_to)!r} must be a folder outside the store {store_dir} (the model is saved "
                "there and replaces what it holds)."
            )
    if store_dir.exists() and not store_dir.is_dir():
        raise StoreError(f"store_dir {store_dir} is a file, not a store folder; point it at the store folder.")
    if ids.size == 0:  # nothing to forget: nothing measured, subtracted, saved or audited
        logger.warning("forget: the request holds no ids; nothing was changed.")
        return ForgetReport(scale=0.0, seconds=time.perf_counter() - began)
    data = None
    if scale == "auto" or repair_steps == "auto":
        data = gather(
            context.train_dataset,
            id_column=context.args.id_column,
            seed=context.args.seed,
            planned_steps=context.planned_steps() if context.train_dataset is not None else 0,
            ids=ids,
            forgotten=forgotten_ids(context.model),
            holdout=context.eval_dataset if holdout is None else holdout,
            whole_class=whole_class,
            need_holdout=scale == "auto",
            hold_unseen=repair_steps == "auto" and config.hold_unseen,
            config=config,
        )
    main = context.is_main_process
    committing = save_to is not None and main and store_dir.is_dir()
    with store_lock(store_dir) if committing else nullcontext():
        if committing:
            recover(store_dir)
        context.wait_for_everyone()
        report = _serve_locked(context, ids, config, scale, repair_steps, strict, save_to, purge, data)
        context.wait_for_everyone()
    report.seconds = time.perf_counter() - began
    return report


def _serve_locked(
    context: ForgetContext, ids, config, scale, repair_steps, strict, save_to, purge, data
) -> ForgetReport:
    model, args = context.model, context.args
    store_dir = Path(args.store_dir)
    reader = StoreReader(store_dir)
    layout = ParamLayout.from_model(model)
    if reader.manifest.layout.fingerprint() != layout.fingerprint():
        raise StoreError(
            f"the store at {store_dir} belongs to another model or set of trainable parameters; "
            "load the model the store was recorded for."
        )
    if save_to is not None and any(recording_marker(store_dir, r).exists() for r in range(reader.manifest.num_shards)):
        raise StoreError(
            f"a training run is recording into {store_dir} (or one was interrupted); commit forget requests "
            "after it finished, or resume it first."
        )
    if save_to is not None and context.is_main_process:
        check_audit(store_dir)  # its record is appended after the commit point, where nothing may fail
    done = set(forgotten_ids(model))
    if save_to is not None:
        refuse_stale_model(Path(save_to), done)
    already = [i for i in ids.tolist() if i in done]
    unknown = [i for i in ids.tolist() if i not in done and not reader.locate(i)]
    if strict and unknown:
        raise ForgetRequestError(
            f"{len(unknown)} ids are not in the store (e.g. {unknown[:5]}); nothing was changed. "
            "Drop them or call forget(..., strict=False) to skip them."
        )
    skip = done | set(unknown)
    todo = np.array([i for i in ids.tolist() if i not in skip], dtype=np.int64)
    params = layout.params_of(model)
    before = weights_fingerprint(params) if save_to is not None else None
    update = forget_update(reader, todo)
    if scale == "auto" and config.weight_by_kept_share:  # every tensor at the same share of its whole change
        update = update * kept_share_weights(reader.manifest)
    if repair_steps == "auto":
        data.original_accuracy = context.measure.accuracy(data.retained_sample)
        prepare_unseen_hold(
            data,
            context.measure,
            train_dataset=context.train_dataset,
            id_column=args.id_column,
            seed=args.seed,
            todo=todo,
            config=config,
        )
    attempts = ModelAttempts(
        model=model,
        params=params,
        update=update,
        measure=context.measure,
        data=data,
        config=config,
        ceiling=config.scale_ceiling(reader.manifest.keep_fraction),
        args=args,
        repair_fixed=lambda steps: _repair_fixed(context, steps),
    )
    committed = False
    try:
        set_forgotten(model, sorted(done | set(todo.tolist())))
        outcome = ForgetPolicy(config, attempts).run(scale, repair_steps, len(todo))
        report = ForgetReport(
            forgotten=todo.tolist(),
            already_forgotten=already,
            unknown=unknown,
            delta_norm=outcome.scale * float(update.norm()),
            scale=outcome.scale,
            repair_steps=outcome.repair_steps,
            calibration=outcome.trace,
        )
        if save_to is not None:
            if context.is_main_process:
                roll_back(Path(save_to))
            context.wait_for_everyone()
            context.save_model(str(staging_dir(save_to)))
            context.wait_for_everyone()
            if context.is_main_process:
                purged = np.array(sorted(i for i in done | set(todo.tolist()) if reader.locate(i)), dtype=np.int64)
                audit = audit_record(
                    ids,
                    report.forgotten,
                    already,
                    unknown,
                    report.delta_norm,
                    outcome.scale,
                    outcome.repair_steps,
                    before,
                    weights_fingerprint(params),
                    save_to,
                    purge,
                    key=load_key(store_dir),
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
            attempts.restore(attempts.original)
            set_forgotten(model, sorted(done))
            if save_to is not None and context.is_main_process:
                roll_back(Path(save_to))
        raise
    return report


def _repair_fixed(context: ForgetContext, steps: int) -> None:
    """A fine-tune of exactly `steps` steps on the training rows the model has not forgotten."""
    retained = without_ids(context.train_dataset, context.args.id_column, set(forgotten_ids(context.model)))
    finetune(context.model, retained, steps, context.args, data_collator=context.measure.collate)

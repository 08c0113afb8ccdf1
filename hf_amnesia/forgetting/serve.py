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
from ..data import dataset_ids, without_ids
from ..errors import ForgetIncompleteError, ForgetRequestError, StoreError
from ..faults import crash_point
from ..layout import ParamLayout
from ..store import MANIFEST_NAME, StoreReader, recording_marker
from ..store.audit import check_audit
from ..store.journal import (
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
from ..store.lineage import register
from .attempts import ModelAttempts
from .config import ForgetConfig
from .measure import Measurer
from .policy import ForgetPolicy
from .prepare import gather, prepare_unseen_hold
from .record import (
    forgotten_ids,
    legacy_ids,
    model_record,
    purged_ids,
    refuse_stale_model,
    restore_record,
    set_record,
    standing,
)
from .repair import finetune
from .request import ForgetReport, check_choices, normalize_ids
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
    planned_steps: Callable[..., int]  # the training's optimizer steps (over `num_rows` rows, default the train set's)
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
    if "auto" in (scale, repair_steps):  # what the automatic choice measures: accuracy or loss
        config = config.resolved(context.measure.sequence_rows(context.train_dataset))
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
    main = context.is_main_process
    # The main process locks the store for every request (in memory too: it registers the weights
    # it makes); the others wait for it at the barriers.
    locking = main and (store_dir / MANIFEST_NAME).is_file()
    with store_lock(store_dir) if locking else nullcontext():
        if locking:
            recover(store_dir)
        context.wait_for_everyone()
        request = _Request(ids, config, scale, repair_steps, holdout, whole_class, strict, save_to, purge)
        report = _serve_locked(context, request)
        context.wait_for_everyone()
    report.seconds = time.perf_counter() - began
    return report


@dataclass
class _Request:
    ids: np.ndarray
    config: ForgetConfig
    scale: float | str
    repair_steps: int | str
    holdout: object
    whole_class: bool | None
    strict: bool
    save_to: object
    purge: bool


def _serve_locked(context: ForgetContext, request: _Request) -> ForgetReport:
    model, args, ids, config, save_to = context.model, context.args, request.ids, request.config, request.save_to
    store_dir = Path(args.store_dir)
    reader = StoreReader(store_dir)
    layout = ParamLayout.from_model(model)
    if reader.manifest.layout.fingerprint() != layout.fingerprint():
        raise StoreError(
            f"the store at {store_dir} belongs to another model or set of trainable parameters; "
            "load the model the store was recorded for (a PEFT adapter with is_trainable=True)."
        )
    if save_to is not None and any(recording_marker(store_dir, r).exists() for r in range(reader.manifest.num_shards)):
        raise StoreError(
            f"a training run is recording into {store_dir} (or one was interrupted); commit forget requests "
            "after it finished, or resume it first."
        )
    if save_to is not None and context.is_main_process:
        check_audit(store_dir)  # its record is appended after the commit point, where nothing may fail
    params = layout.params_of(model)
    mine = standing(model, params, store_dir, reader.manifest)
    if save_to is not None:
        refuse_stale_model(Path(save_to), mine, store_dir)
    done = mine.forgotten(ids)
    purged = set(purged_ids(reader.states).tolist())
    rest = ids[~done].tolist()
    located = [i for i in rest if reader.locate(i)]
    held = set(located)
    elsewhere = [i for i in rest if i in purged and i not in held]
    unknown = sorted(set(rest) - set(located) - set(elsewhere))
    if request.strict and (unknown or elsewhere):
        raise ForgetRequestError(
            f"{len(unknown)} ids are not in the store (e.g. {unknown[:5]}) and {len(elsewhere)} were purged from it "
            f"when another model forgot them (e.g. {elsewhere[:5]}: this model still holds their influence, and "
            "the store can no longer remove it); nothing was changed. Drop them, or call forget(..., strict=False) "
            "to skip them."
        )
    todo = np.array(located, dtype=np.int64)
    train_ids = None  # read only when there is something to find among them (a pass over every row)
    if mine.digests and context.train_dataset is not None:
        train_ids = dataset_ids(context.train_dataset, args.id_column)
    earlier = forgotten_ids(mine, reader, train_ids)
    data = _gather(context, request, todo, earlier, reader)
    update = forget_update(reader, todo)
    if request.scale == "auto" and config.weight_by_kept_share:  # every tensor at the same share of its whole change
        update = update * kept_share_weights(reader.manifest)
    if request.repair_steps == "auto":
        losses, correct = context.measure.evaluate(data.retained_sample)  # one pass: accuracy and loss
        data.original_loss = float(np.mean(losses))
        if correct is not None:  # sequences have no accuracy
            data.original_accuracy = float(100.0 * np.mean(correct))
        prepare_unseen_hold(
            data,
            context.measure,
            train_dataset=context.train_dataset,
            id_column=args.id_column,
            seed=args.seed,
            todo=todo,
            config=config,
        )
    leave_out = set(earlier) | set(located)
    attempts = ModelAttempts(
        model=model,
        params=params,
        update=update,
        measure=context.measure,
        data=data,
        config=config,
        ceiling=config.scale_ceiling(reader.manifest.keep_fraction),
        args=args,
        repair_fixed=lambda steps: _repair_fixed(context, steps, leave_out),
    )
    record, legacy = model_record(model), legacy_ids(model)
    try:
        outcome = ForgetPolicy(config, attempts).run(request.scale, request.repair_steps, len(todo))
        report = ForgetReport(
            forgotten=todo.tolist(),
            already_forgotten=ids[done].tolist(),
            unknown=unknown,
            purged_elsewhere=elsewhere,
            delta_norm=outcome.scale * float(update.norm()),
            scale=outcome.scale,
            repair_steps=outcome.repair_steps,
            calibration=outcome.trace,
        )
        after = mine.with_ids(weights_fingerprint(params), todo.tolist())
        if todo.size and after.weights == mine.weights:  # weights name a model state: these are still the original's
            logger.warning(
                "forget: the request left the weights as they were (nothing subtracted, no repair step), so "
                "nothing is recorded as forgotten, saved or purged. Call it with a scale above 0 (or repair steps) "
                "to change the model."
            )
            report.forgotten = []
            return report
        set_record(model, after)
        if save_to is None:
            if context.is_main_process:
                register(store_dir, after.weights, after.digests)  # so these weights may be saved and served
        else:
            _commit(context, request, reader, report, outcome, mine, after, sorted(leave_out))
    except BaseException as err:
        if isinstance(err, ForgetIncompleteError):  # past the commit point: the saved model is the new one
            raise
        attempts.restore(attempts.original)
        restore_record(model, record, legacy)
        if save_to is not None and context.is_main_process:
            roll_back(Path(save_to))
        raise
    return report


def _gather(context: ForgetContext, request: _Request, todo: np.ndarray, earlier: list[int], reader: StoreReader):
    """The data the automatic choices need (None when both are fixed), checked before any change.
    The repair's budget is a share of the training's steps: planned over the rows the store
    recorded, so that rows deleted since do not shrink it."""
    if request.scale != "auto" and request.repair_steps != "auto":
        return None
    planned = 0
    if context.train_dataset is not None:
        planned = context.planned_steps(max(len(context.train_dataset), reader.recorded_count()))
    return gather(
        context.train_dataset,
        id_column=context.args.id_column,
        seed=context.args.seed,
        planned_steps=planned,
        ids=request.ids,
        todo=todo,
        forgotten=earlier,
        holdout=context.eval_dataset if request.holdout is None else request.holdout,
        whole_class=request.whole_class,
        need_holdout=request.scale == "auto",
        hold_unseen=request.repair_steps == "auto" and request.config.hold_unseen,
        config=request.config,
        sequence_rows=context.measure.sequence_rows,
    )


def _commit(context, request, reader, report, outcome, mine, after, forgotten) -> None:
    """Save, purge and audit as one transaction (the main process; the others only save). An error
    after the commit point is a `ForgetIncompleteError`: `recover` finishes the request."""
    store_dir, save_to = Path(context.args.store_dir), Path(request.save_to)
    if context.is_main_process:
        roll_back(save_to)
    context.wait_for_everyone()
    context.save_model(str(staging_dir(save_to)))
    context.wait_for_everyone()
    report.committed = True
    if not context.is_main_process:
        return
    purged = np.array([i for i in forgotten if reader.locate(i)], dtype=np.int64)
    audit = audit_record(
        request.ids,
        report.forgotten,
        report.already_forgotten,
        report.unknown,
        report.delta_norm,
        outcome.scale,
        outcome.repair_steps,
        mine.weights,
        after.weights,
        save_to,
        request.purge,
        key=mine.key,
    )
    lineage = {"weights": after.weights, "forgotten": sorted(after.digests)}
    entry = prepare(save_to, purged if request.purge else None, audit, lineage=lineage)
    crash_point("forget:staged")
    commit(store_dir, entry)
    report.request = audit["request"]
    try:
        crash_point("forget:committed")
        roll_forward(store_dir, entry, crash_at=crash_point)  # the store's model is now the saved one
    except BaseException as err:
        raise ForgetIncompleteError(
            f"the request {audit['request']} is committed but not finished ({type(err).__name__}: {err}). Run "
            f"`hf-amnesia recover {store_dir}` (or hf_amnesia.store.journal.recover) to finish it."
        ) from err


def _repair_fixed(context: ForgetContext, steps: int, forgotten: set[int]) -> None:
    """A fine-tune of exactly `steps` steps on the training rows the model has not forgotten."""
    retained = without_ids(context.train_dataset, context.args.id_column, forgotten)
    finetune(context.model, retained, steps, context.args, data_collator=context.measure.collate)

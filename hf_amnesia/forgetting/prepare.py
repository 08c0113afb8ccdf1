"""The data the automatic scale and repair measure on, gathered and checked before a request changes anything."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np

from ..data import dataset_ids, labels_of, select_rows, without_ids
from ..errors import ForgetRequestError
from .config import ForgetConfig
from .hold import forgotten_classes, misfit_loss, retained_sample, unsupported_by_neighbours
from .measure import Measurer

logger = logging.getLogger(__name__)

EXACT = "or call forget(ids, scale=1.0, repair_steps=0) for the exact subtraction, which needs no data"


@dataclasses.dataclass
class ForgetData:
    """What the automatic scale and repair measure on."""

    classes: list[int]  # labels the request removes whole
    retained: object  # the training rows the request keeps
    retained_sample: object  # a seeded sample of them: the repair is done when their accuracy is back
    planned_steps: int  # the training's optimizer steps (the repair's budget is a share of them)
    holdout: object = None  # held-out rows of the classes the request keeps
    class_rows: object = None  # a sample of the removed classes' training rows
    original_accuracy: float = float("nan")  # on retained_sample, before the subtraction
    original_loss: float = float("nan")  # the mean loss on retained_sample, before the subtraction
    forget_rows: object = None  # the request's training rows, held unseen by the repair
    held_out_losses: np.ndarray | None = None  # the original's losses on the holdout, sorted
    unsupported: np.ndarray | None = None  # forget rows whose label their retained neighbours outvote
    misfit_loss: float = 0.0  # the original's median loss on the held-out rows it misclassifies


def gather(
    train_dataset,
    *,
    id_column: str,
    seed: int,
    planned_steps: int,
    ids: np.ndarray,
    todo: np.ndarray,
    forgotten: list[int],
    holdout,
    whole_class: bool | None,
    need_holdout: bool,
    hold_unseen: bool,
    config: ForgetConfig,
    sequence_rows: Callable[[object], bool],
) -> ForgetData:
    """Check that the automatic choice has the data it needs, and gather it: the holdout for the
    automatic scale (`need_holdout`), and for the automatic repair of a request that removes no
    whole class (`hold_unseen`).

    `todo` are the store's ids the request forgets now; those without a row in `train_dataset`
    were deleted by the user. Their labels are gone with them (the store keeps none), so a request
    holding deleted rows removes the classes every retained row lacks and the holdout has
    (`classes_left_without_rows`), unless `whole_class=False` says it removes none.

    `sequence_rows` tells whether a dataset's collated labels hold a token per position
    (`Measurer.sequence_rows`): such rows remove no class."""
    if train_dataset is None:
        raise ForgetRequestError(
            "the automatic scale and repair need the retained training rows, but this trainer has no "
            f"train_dataset. Pass train_dataset=... to the trainer, {EXACT}."
        )
    train_ids = dataset_ids(train_dataset, id_column)
    requested = np.isin(train_ids, np.union1d(ids, np.asarray(forgotten, dtype=np.int64)))
    if requested.all():
        raise ForgetRequestError(f"the request leaves no training row to repair on; {EXACT}.")
    deleted = np.setdiff1d(todo, train_ids)
    sequences = sequence_rows(train_dataset)
    train_labels = None if sequences else labels_of(train_dataset)
    if sequences:
        classes = _sequence_request(config, whole_class)
    else:
        classes = _class_request(train_labels, requested, len(deleted), holdout, whole_class)
    retained = without_ids(train_dataset, id_column, set(train_ids[requested].tolist()))
    data = ForgetData(
        classes=classes,
        retained=retained,
        retained_sample=select_rows(retained, retained_sample(len(retained), seed, config.retained_sample_rows)),
        planned_steps=planned_steps,
    )
    if classes:  # the removed classes' rows: a class request must stop predicting them
        source = train_dataset
        rows = np.flatnonzero(np.isin(train_labels, classes))
        if set(np.unique(train_labels[rows]).tolist()) != set(classes):  # some classes' rows all deleted
            source = holdout  # then the held-out rows of every removed class
            rows = np.flatnonzero(np.isin(labels_of(holdout), classes))
        data.class_rows = select_rows(source, rows[retained_sample(len(rows), seed, config.retained_sample_rows)])
    if need_holdout or (hold_unseen and not classes and len(deleted) < len(todo)):  # a hold needs rows to hold
        data.holdout = _kept_holdout(holdout, classes, need_holdout, sequence_rows if sequences else None)
    return data


def _class_request(train_labels, requested, num_deleted: int, holdout, whole_class) -> list[int]:
    """The classes a request on rows of one class label each removes whole (`num_deleted` of its
    ids have no training row)."""
    if train_labels is None:
        raise ForgetRequestError(
            "the automatic scale and repair measure the training rows by their labels, but they have no `labels` "
            f"or `label` column of one class per row (or of a token per position); {EXACT}, with your own scale."
        )
    classes = forgotten_classes(train_labels, requested)
    if num_deleted and whole_class is not False:
        gone = classes_left_without_rows(train_labels[~requested], holdout, num_deleted)
        if gone:
            logger.warning(
                "forget: %d requested rows were deleted and no retained training row has label(s) %s, which the "
                "holdout has: the request removes those classes whole (pass whole_class=False if it does not).",
                num_deleted,
                gone,
            )
        classes = sorted(set(classes) | set(gone))
    if whole_class is True and not classes:
        raise ForgetRequestError(
            "whole_class=True, but the request (with what this model already forgot) does not hold every "
            "training row of any label. Request all rows of the class, e.g. ids_of_label(...)."
        )
    return [] if whole_class is False else classes


def _sequence_request(config: ForgetConfig, whole_class: bool | None) -> list[int]:
    """A request on sequences (a token per position) removes no class, and is measured by its loss."""
    problems = []
    if whole_class:
        problems.append("so no request removes a class: leave whole_class unset")
    if config.criterion == "accuracy":
        problems.append("and they have no accuracy: use ForgetConfig(criterion='loss') (or leave it at 'auto')")
    if problems:
        raise ForgetRequestError(
            "the training rows' labels hold a token per position (a language model), not one class per row, "
            + "; ".join(problems)
            + "."
        )
    return []


def _kept_holdout(holdout, classes: list[int], need_holdout: bool, sequence_rows=None):
    """The held-out rows the automatic choice measures: those of the classes the request keeps
    (every row, for sequences: `sequence_rows` given)."""
    if holdout is None or isinstance(holdout, dict):
        what = "a dict of eval datasets" if isinstance(holdout, dict) else "no held-out data"
        needs = 'scale="auto"' if need_holdout else 'repair_steps="auto"'
        raise ForgetRequestError(
            f"{needs} measures held-out rows, but got {what}. Pass holdout=<a split "
            f"never trained on and not your test split> (or eval_dataset=... to the trainer), {EXACT}."
        )
    if sequence_rows is not None:
        if not sequence_rows(holdout):
            raise ForgetRequestError(
                "the training rows are sequences (labels of a token per position), but the holdout's rows carry "
                f"no such labels. Pass held-out rows in the training rows' format, {EXACT}."
            )
        return holdout
    holdout_labels = labels_of(holdout)
    if holdout_labels is None:
        raise ForgetRequestError(f"the holdout rows have no `labels` or `label` column; {EXACT}.")
    kept = np.flatnonzero(~np.isin(holdout_labels, classes))
    if len(kept) == 0:
        raise ForgetRequestError(f"the holdout has no rows of the classes the request keeps; add such rows, {EXACT}.")
    return select_rows(holdout, kept)


def classes_left_without_rows(retained_labels: np.ndarray, holdout, num_deleted: int) -> list[int]:
    """Labels of the holdout that no retained training row carries: the classes a request whose
    rows were deleted removes whole (the labels of deleted rows are gone with them)."""
    if holdout is None or isinstance(holdout, dict):
        what = "a dict of eval datasets" if isinstance(holdout, dict) else "no held-out data"
        raise ForgetRequestError(
            f"{num_deleted} of the requested ids have no row in train_dataset (their data was deleted), and forget "
            "tells whether such a request removes whole classes from the labels of a held-out split, but got "
            f"{what}. Pass holdout=<a labelled split never trained on> (or eval_dataset=... to the trainer), or "
            f"whole_class=False for a request that removes no class, {EXACT}."
        )
    holdout_labels = labels_of(holdout)
    if holdout_labels is None:
        raise ForgetRequestError(
            f"{num_deleted} of the requested ids have no row in train_dataset, and the holdout rows have no "
            "`labels` or `label` column to tell whether the request removes whole classes. Pass a labelled "
            f"holdout, or whole_class=False for a request that removes no class, {EXACT}."
        )
    return sorted(int(c) for c in np.setdiff1d(np.unique(holdout_labels), np.unique(retained_labels)))


def prepare_unseen_hold(
    data: ForgetData,
    measure: Measurer,
    *,
    train_dataset,
    id_column: str,
    seed: int,
    todo: np.ndarray,
    config: ForgetConfig,
) -> None:
    """Unless whole classes go, the automatic repair holds the forget rows unseen
    (`hold.unseen_targets`): it needs the request's rows, the original's held-out losses, and
    which forget rows their nearest retained rows do not support (`unsupported_by_neighbours`,
    on the original's features)."""
    if not config.hold_unseen or data.classes or data.holdout is None or not len(todo):
        return
    rows = np.flatnonzero(np.isin(dataset_ids(train_dataset, id_column), todo))
    if not len(rows):  # the user deleted them: the repair is a plain one on the retained rows
        return
    data.forget_rows = select_rows(train_dataset, rows)
    losses, correct = measure.evaluate(data.holdout)  # one pass: the losses and which rows it gets wrong
    data.held_out_losses = np.sort(losses)
    if correct is None:  # sequences: no class to misfit, no label for neighbours to vote on
        return
    data.misfit_loss = misfit_loss(losses, correct)
    if not config.neighbour_vote:
        return
    features, labels = measure.features(data.forget_rows)
    neighbours = select_rows(data.retained, retained_sample(len(data.retained), seed, config.neighbour_rows))
    retained_features, retained_labels = measure.features(neighbours)
    if features is None or retained_features is None:
        logger.warning(
            "forget: the model's classifier layer (its last nn.Linear) does not take one feature vector "
            "per row, so the repair cannot tell which forget rows the retained data does not support; "
            "it holds them at held-out losses only."
        )
        return
    data.unsupported = unsupported_by_neighbours(
        features, labels, retained_features, retained_labels, k=config.neighbours
    )

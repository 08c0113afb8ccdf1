"""The study's scenarios: which rows each request forgets, the canaries, the held-out split.

`plan_forget_sets` draws every scenario's forget set once, before training (the per-batch
baselines must know them); `plant_canaries` gives a share of the rows a wrong label;
`split_validation` holds out the rows `forget` measures on. docs/evaluation.md, "Scenarios".
"""

from __future__ import annotations

import numpy as np
from datasets import concatenate_datasets

SCENARIOS = ("class", "random_10", "random_1", "canary_1")
SEQUENCE = "sequence_5"  # five successive requests on one model, each a fifth of the canaries (fewer if fewer)


def plan_forget_sets(
    train_ids: np.ndarray, labels: np.ndarray, forget_class: int, seed: int, scenarios, canaries=None
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 12345)
    planned = {}
    for name in scenarios:
        if name == "class":
            chosen = train_ids[labels == forget_class]
            if len(chosen) == 0:
                raise ValueError(
                    f"no training row has label {forget_class}; pick --forget_class from the labels present."
                )
        elif name in ("canary_1", SEQUENCE):
            chosen = canaries.ravel()  # [canary, copy] ids: every copy
        elif name.startswith("random_"):
            # Typical rows: a canary copy's twins stay behind, so Retrain still fits it (not a do-no-harm row).
            typical = train_ids if canaries is None else np.setdiff1d(train_ids, np.ravel(canaries))
            share = int(name.split("_")[1]) / 100.0
            chosen = rng.choice(typical, size=max(1, round(share * len(train_ids))), replace=False)
        else:
            raise ValueError(f"unknown scenario {name!r}; choose from {SCENARIOS} and {SEQUENCE}.")
        planned[name] = np.sort(chosen)
    return planned


def plant_canaries(
    dataset, label_column: str, share: float, seed: int, copies: int = 1, id_column: str = "id", next_id=None
):
    """Give `share` of the rows (seeded) a random wrong label; returns (dataset, rows), where rows[c, j]
    is the row of copy j of canary c (j = 0 the relabeled row itself).

    With `copies` > 1 each canary is also appended `copies - 1` times, same features and wrong
    label, each copy with its own id from `next_id` on (default: one above the largest id), so that
    the model memorises them. Retrain never sees any copy, so forgetting them all is a request
    whose effect the metrics can see (scenario `canary_1`).
    """
    if copies < 1:
        raise ValueError(f"canary_copies must be at least 1, got {copies}.")
    labels = np.asarray(dataset[label_column])
    rng = np.random.default_rng(seed + 777)
    rows = np.sort(rng.choice(len(labels), size=max(1, round(share * len(labels))), replace=False))
    classes = np.unique(labels)
    wrong = labels.copy()
    for row in rows:
        wrong[row] = rng.choice(classes[classes != labels[row]])
    form = dataset.format
    relabeled = dataset.with_format(None).remove_columns(label_column).add_column(label_column, wrong)
    if copies == 1:
        return relabeled.with_format(form["type"]), rows[:, None]
    if id_column not in relabeled.column_names:
        raise ValueError(f"canary copies need an id column {id_column!r} to give each copy its own id.")
    repeated = np.repeat(rows, copies - 1)  # a canary's copies side by side
    first = int(np.max(relabeled[id_column])) + 1 if next_id is None else int(next_id)
    new_ids = np.arange(first, first + len(repeated), dtype=np.int64)
    appended = relabeled.select(repeated).remove_columns(id_column).add_column(id_column, new_ids)
    planted = concatenate_datasets([relabeled, appended.select_columns(relabeled.column_names)])
    copy_rows = len(labels) + np.arange(len(repeated)).reshape(len(rows), copies - 1)
    return planted.with_format(form["type"]), np.column_stack([rows, copy_rows])


def split_validation(dataset, share: float, seed: int):
    """(train, validation): `share` of the rows held out, never trained on (forget's automatic scale)."""
    if share <= 0:
        return dataset, None
    order = np.random.default_rng(seed + 4242).permutation(len(dataset))
    cut = max(1, round(share * len(dataset)))
    return dataset.select(np.sort(order[cut:])), dataset.select(np.sort(order[:cut]))

"""What the automatic repair measures and holds (pure numpy; no torch, no transformers).

The repair fine-tunes on the retained rows until a fixed sample of them (`retained_sample`) is
back at the original's accuracy. Unless whole classes go (`forgotten_classes`), its loss also
holds the forget rows unseen (`unseen_targets`): no forget row may fit better than the held-out
row of its rank, nor better than the subtraction left it; and a forget row whose nearest
retained rows mostly carry another label (`unsupported_by_neighbours`) is held at the loss of a
misclassified held-out row (`misfit_loss`): Retrain predicts a row from the rest of the data, and
the rest of the data does not support that row's label.
"""

from __future__ import annotations

import numpy as np


def retained_sample(num_rows: int, seed: int, size: int) -> np.ndarray:
    """Fixed (seeded) row indices of the retained data on which repair progress is measured."""
    if num_rows <= size:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=size, replace=False))


def forgotten_classes(labels: np.ndarray, requested: np.ndarray) -> list[int]:
    """Labels whose every training row is in the request (`requested` is a boolean row mask)."""
    labels = np.asarray(labels)
    return sorted(int(c) for c in np.unique(labels[requested]) if requested[labels == c].all())


def unsupported_by_neighbours(
    features: np.ndarray,
    labels: np.ndarray,
    retained_features: np.ndarray,
    retained_labels: np.ndarray,
    k: int,
    chunk: int = 1024,
) -> np.ndarray:
    """Rows whose own label gets fewer than half of the votes of their k nearest retained rows.

    Nearest by cosine similarity of the features (the original model's input to its classifier
    layer). Retrain predicts a forget row from the rest of the data; when the rows closest to it
    mostly carry another label (a mislabeled or atypical row the model memorised), Retrain most
    likely misclassifies it. Measured on MNIST 5k (docs/history/2026-11-results-notebook.md): 33-36
    of 36 mislabeled rows flagged (seeds 22-24, 28), and fewer random rows than Retrain
    misclassifies (seed 24).
    """
    labels, retained_labels = np.asarray(labels), np.asarray(retained_labels)
    if len(retained_labels) == 0 or len(labels) == 0:
        return np.zeros(len(labels), dtype=bool)
    features = np.asarray(features, dtype=np.float32).reshape(len(labels), -1)
    retained = np.asarray(retained_features, dtype=np.float32).reshape(len(retained_labels), -1)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    features, retained = unit(features), unit(retained)
    k = min(k, len(retained))
    flagged = np.zeros(len(labels), dtype=bool)
    for start in range(0, len(labels), chunk):
        similarity = features[start : start + chunk] @ retained.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        votes = (retained_labels[nearest] == labels[start : start + chunk, None]).sum(axis=1)
        flagged[start : start + chunk] = 2 * votes < k
    return flagged


def misfit_loss(held_out_losses: np.ndarray, held_out_correct: np.ndarray) -> float:
    """The loss an unsupported forget row is held at: the median loss of the held-out rows the
    original model misclassifies (the largest held-out loss if it misclassifies none)."""
    losses = np.asarray(held_out_losses, dtype=np.float64)
    wrong = losses[~np.asarray(held_out_correct, dtype=bool)]
    return float(np.median(wrong)) if len(wrong) else float(losses.max())


def unseen_targets(
    losses: np.ndarray,
    after_subtraction: np.ndarray,
    held_out_sorted: np.ndarray,
    unsupported: np.ndarray | None = None,
    misfit: float = 0.0,
) -> np.ndarray:
    """Least loss each forget row of a repair batch may have: min(a_i, h_q(i)), and at least
    `misfit` for the rows flagged `unsupported` (`unsupported_by_neighbours`).

    Retrain never saw the forget rows, so they should fit like held-out rows: row i, ranked by its
    current loss within the batch, is held to the held-out loss at the same quantile, h_q(i)
    (1-D quantile matching; `held_out_sorted` holds the original model's losses on held-out rows).
    A row is never pushed beyond its loss right after the subtraction, a_i: the subtraction's
    damage is not the repair's target, only what the repair would fit back. A row whose label the
    retained data does not support would be misclassified by Retrain: it is held at the loss of a
    misclassified held-out row however well the subtraction left it fitting.
    """
    losses = np.asarray(losses, dtype=np.float64)
    ranks = np.argsort(np.argsort(losses, kind="stable"), kind="stable")
    quantiles = np.quantile(np.asarray(held_out_sorted, dtype=np.float64), (ranks + 0.5) / len(losses))
    targets = np.minimum(np.asarray(after_subtraction, dtype=np.float64), quantiles)
    if unsupported is not None:
        targets = np.where(np.asarray(unsupported, dtype=bool), np.maximum(targets, misfit), targets)
    return targets

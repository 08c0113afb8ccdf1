"""How much of a request to subtract, and when the repair is done, without Retrain (no transformers).

The stored deltas of a request are exact per-sample shares of training, but partial (only the
kept entries) and first-order (each was computed along the original trajectory, and the
shares of one batch cancel each other). Subtracting them at scale 1 forgets too little at small
keep fractions and breaks the model at large ones, so `forget(ids)` chooses the scale from data
the user has (docs/method.md, "Choosing the scale"; measurements in docs/results.md):

- **scale**: applied to the stored sum with each tensor weighted by the inverse of the share
  of its rows a sample keeps (`forget.kept_share_weights`), the largest `s` whose subtraction
  costs at most `max_harm` accuracy points on held-out rows of the classes the request keeps.
  Harm grows with `s`, so a bisection on `log s` finds it in a few evaluations of the held-out
  split. When the request removes whole classes and that scale still leaves them recognisable
  (accuracy on their rows above 1 %), the smallest scale that does not is taken instead: Retrain
  cannot predict a class it never saw.
- **repair**: fine-tune on the retained rows until accuracy on a fixed sample of them is back at
  the original model's level, for at most a tenth of the training's steps (when whole classes go,
  for all of them, which measured closer to Retrain). If it is not back by then, the
  subtraction was more than the repair can mend: start again from the original weights with half
  the harm budget (at most `HARM_RETRIES` times). If it is back but a removed class is
  recognisable again, start again from the original weights at twice the scale (at most
  `CLASS_RETRIES` times, never above the ceiling). Unless whole classes go,
  the repair's loss also holds the forget rows unseen (`unseen_targets`): no forget row may fit
  better than the held-out row of its rank, nor better than the subtraction left it; and a
  forget row whose nearest retained rows (in the original model's features) mostly carry
  another label (`unsupported_by_neighbours`) is held at the loss of a misclassified held-out
  row (`misfit_loss`): Retrain predicts a row from the rest of the data, and the rest of the
  data does not support that row's label.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

REPAIR_SHARE = 0.1  # the repair runs for at most this share of the training's optimizer steps
RETAINED_SAMPLE = 1024  # retained rows whose accuracy decides when the repair is done
CLASS_ACCURACY_TARGET = 1.0  # a removed class counts as forgotten at <= 1 % accuracy on its rows
HARM_RETRIES = 3  # halvings of max_harm tried when the repair cannot mend a subtraction within its budget
CLASS_RETRIES = 3  # doublings of the scale tried when a repair that mended the subtraction brought a removed class back
NEIGHBOURS = 10  # retained rows that vote on whether a forget row's label is supported by the rest of the data
NEIGHBOUR_ROWS = 20000  # at most this many retained rows (a seeded sample) are candidate neighbours


@dataclass
class ScaleChoice:
    """The scale `forget` chose, and every (scale, harm in accuracy points) it measured."""

    scale: float
    trace: list[tuple[float, float]] = field(default_factory=list)


def scale_ceiling(keep_fraction: float) -> float:
    """Largest scale the search tries: 4 / sqrt(p) (4 at p = 1, 40 at p = 1 %).

    The kept entries of a request hold about p of its change; scaling them by 1 / sqrt(p) gives
    them the norm of the whole change, and the factor 4 leaves room above that.
    """
    return 4.0 / math.sqrt(keep_fraction)


def _probe(measure: Callable[[float], float], trace: list[tuple[float, float]]) -> Callable[[float], float]:
    """`measure` taken at 2**log_scale, every (scale, value) appended to `trace`."""

    def at(log_scale: float) -> float:
        value = float(measure(2.0**log_scale))
        trace.append((2.0**log_scale, value))
        return value

    return at


def _bisect(below: Callable[[float], bool], low: float, high: float, steps: int) -> tuple[float, float]:
    """Narrow [low, high] (log2 scales) around where `below` turns from True (at low) to False."""
    for _ in range(steps):
        middle = (low + high) / 2
        if below(middle):
            low = middle
        else:
            high = middle
    return low, high


def largest_safe_scale(
    harm: Callable[[float], float], max_harm: float, ceiling: float, octaves: int = 10, steps: int = 7
) -> ScaleChoice:
    """The largest scale in [ceiling / 2**octaves, ceiling] with `harm(scale) <= max_harm`.

    Bisection on log2(scale), assuming harm grows with the scale: `steps + 2` evaluations at
    most, resolution `octaves / 2**steps` octaves. Returns scale 0 when even the smallest scale
    does more harm than allowed.
    """
    trace: list[tuple[float, float]] = []
    harm_at = _probe(harm, trace)
    high = math.log2(ceiling)
    if harm_at(high) <= max_harm:
        return ScaleChoice(ceiling, trace)
    low = high - octaves
    if harm_at(low) > max_harm:
        return ScaleChoice(0.0, trace)
    low, _ = _bisect(lambda s: harm_at(s) <= max_harm, low, high, steps)
    return ScaleChoice(2.0**low, trace)


def smallest_scale_reaching(
    accuracy: Callable[[float], float], target: float, low: float, high: float, steps: int = 7
) -> ScaleChoice:
    """The smallest scale in [low, high] with `accuracy(scale) <= target` (accuracy falls as the
    scale grows): `low` if it already does, `high` if nothing does; else bisection on log2(scale).
    The trace holds (scale, accuracy) pairs."""
    trace: list[tuple[float, float]] = []
    accuracy_at = _probe(accuracy, trace)
    low, high = math.log2(low if low > 0 else high / 2**10), math.log2(high)
    if accuracy_at(low) <= target:
        return ScaleChoice(2.0**low, trace)
    if accuracy_at(high) > target:
        return ScaleChoice(2.0**high, trace)
    _, high = _bisect(lambda s: accuracy_at(s) > target, low, high, steps)
    return ScaleChoice(2.0**high, trace)


def forgotten_classes(labels: np.ndarray, requested: np.ndarray) -> list[int]:
    """Labels whose every training row is in the request (`requested` is a boolean row mask)."""
    labels = np.asarray(labels)
    return sorted(int(c) for c in np.unique(labels[requested]) if requested[labels == c].all())


def accuracy_points(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float(100.0 * np.mean(np.asarray(predicted) == np.asarray(labels))) if len(labels) else float("nan")


def repair_budget(planned_training_steps: int) -> int:
    """Most optimizer steps an automatic repair may take: a tenth of training, at least 1."""
    return max(1, math.ceil(REPAIR_SHARE * planned_training_steps))


def repair_check_every(budget: int) -> int:
    """How often (in steps) the automatic repair checks whether it is done: ~10 checks per budget."""
    return max(1, budget // 10)


def retained_sample(num_rows: int, seed: int, size: int = RETAINED_SAMPLE) -> np.ndarray:
    """Fixed (seeded) row indices of the retained data on which repair progress is measured."""
    if num_rows <= size:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=size, replace=False))


def unsupported_by_neighbours(
    features: np.ndarray,
    labels: np.ndarray,
    retained_features: np.ndarray,
    retained_labels: np.ndarray,
    k: int = NEIGHBOURS,
    chunk: int = 1024,
) -> np.ndarray:
    """Rows whose own label gets fewer than half of the votes of their k nearest retained rows.

    Nearest by cosine similarity of the features (the original model's input to its classifier
    layer). Retrain predicts a forget row from the rest of the data; when the rows closest to it
    mostly carry another label (a mislabeled or atypical row the model memorised), Retrain most
    likely misclassifies it. Measured on MNIST 5k (docs/results.md): 33-36 of 36 mislabeled rows
    flagged (seeds 22-24, 28), and fewer random rows than Retrain misclassifies (seed 24).
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

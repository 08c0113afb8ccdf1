"""The scale search of the automatic forget (pure; no torch, no transformers).

The stored deltas of a request are exact per-sample shares of training, but partial (only the
kept entries) and first-order (each was computed along the original trajectory, and the shares
of one batch cancel each other). Subtracting them at scale 1 forgets too little at small keep
fractions and breaks the model at large ones, so `forget(ids)` searches the scale on data the
user has: the largest `s` whose subtraction costs at most `max_harm` accuracy points (or, with
criterion='loss', adds at most `max_loss_harm` nats of mean loss) on held-out rows of the classes
the request keeps (harm grows with `s`, so a bisection on `log s` finds it in
a few evaluations). When the request removes whole classes and that scale still leaves them
recognisable, the smallest scale that does not is taken instead: Retrain cannot predict a class
it never saw. docs/method.md, "The forget policy, step by step", explains each step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class ScaleChoice:
    """The scale `forget` chose, and every (scale, harm) it measured (accuracy points, or nats)."""

    scale: float
    trace: list[tuple[float, float]] = field(default_factory=list)


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
    harm: Callable[[float], float], max_harm: float, ceiling: float, octaves: int, steps: int
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
    accuracy: Callable[[float], float], target: float, low: float, high: float, octaves: int, steps: int
) -> ScaleChoice:
    """The smallest scale in [low, high] with `accuracy(scale) <= target` (accuracy falls as the
    scale grows): `low` if it already does, `high` if nothing does; else bisection on log2(scale).
    The trace holds (scale, accuracy) pairs."""
    trace: list[tuple[float, float]] = []
    accuracy_at = _probe(accuracy, trace)
    low, high = math.log2(low if low > 0 else high / 2**octaves), math.log2(high)
    if accuracy_at(low) <= target:
        return ScaleChoice(2.0**low, trace)
    if accuracy_at(high) > target:
        return ScaleChoice(2.0**high, trace)
    _, high = _bisect(lambda s: accuracy_at(s) > target, low, high, steps)
    return ScaleChoice(2.0**high, trace)


def choose_scale(
    harm: Callable[[float], float],
    class_accuracy: Callable[[float], float] | None,
    max_harm: float,
    ceiling: float,
    target: float,
    octaves: int,
    steps: int,
) -> ScaleChoice:
    """The largest scale whose `harm` is at most `max_harm`; when whole classes go
    (`class_accuracy` given), at least the smallest scale that brings their accuracy down to
    `target`, so that the repair starts from a model that no longer predicts them."""
    choice = largest_safe_scale(harm, max_harm, ceiling, octaves, steps)
    if class_accuracy is None:
        return choice
    reached = smallest_scale_reaching(class_accuracy, target, choice.scale, ceiling, octaves, steps)
    choice.trace.extend(reached.trace)
    choice.scale = max(choice.scale, reached.scale)
    return choice

"""The forget policy: which subtraction to keep, given ways to try one (pure; no torch, no transformers).

`ForgetPolicy.run` drives an `Attempts` object, which knows how to subtract at a scale (always
from the original weights), repair, measure and keep or restore weights, and decides:

1. the scale: the given one, or `choose_scale` (the largest whose subtraction costs at most
   `max_harm` held-out accuracy points, or with criterion='loss' adds at most `max_loss_harm`
   nats to the held-out mean loss; for a whole class at least the smallest that makes it
   unrecognisable);
2. after the automatic repair: if it did not bring the retained rows back (their accuracy, or with
   criterion='loss' their mean loss) within its budget, the subtraction was more than the repair
   can mend: start again from the original weights with half the harm budget (at most
   `harm_retries` times; a halving that gives no smaller scale is skipped). If an attempt brings
   a removed class back and an earlier, unmended attempt kept it forgotten, keep that earlier one
   (smaller scales only leave more of the class). If a mended attempt brings the class back, try
   twice the scale (at most `class_retries` times, never above the ceiling) and keep the first
   attempt that leaves the class forgotten.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from .config import ForgetConfig
from .scale import ScaleChoice, choose_scale

logger = logging.getLogger(__name__)


class Attempts(Protocol):
    """The operations the policy needs; each subtraction starts from the original weights."""

    has_classes: bool  # the request removes whole classes
    sampled: int  # training rows of the removed classes that `recognised` measures
    ceiling: float  # the largest scale the policy may try

    def harm(self, scale: float) -> float: ...  # held-out accuracy points lost (or nats gained) at this scale
    def class_accuracy(self, scale: float) -> float: ...  # accuracy (%) on the removed classes' rows
    def subtract(self, scale: float) -> None: ...  # the weights become the original minus scale * update
    def repair(self) -> tuple[int, bool]: ...  # the automatic repair: (steps, retained rows back)
    def repair_fixed(self, steps: int) -> None: ...  # a fine-tune of exactly `steps` steps
    def recognised(self, steps: int) -> float | None: ...  # accuracy on the removed classes after a repair
    def keep(self) -> object: ...  # a copy of the current weights
    def restore(self, kept: object) -> None: ...  # put a copy back


@dataclass
class Outcome:
    """The attempt the policy kept: its scale, repair steps, and every (scale, measure) tried."""

    scale: float
    repair_steps: int
    trace: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class _Tried:
    scale: float
    steps: int
    weights: object
    recognised: float | None


class ForgetPolicy:
    """Chooses the subtraction and repair of one request (module docstring)."""

    def __init__(self, config: ForgetConfig, attempts: Attempts):
        self.config, self.attempts = config, attempts

    def class_back(self, recognised: float | None) -> bool:
        """Whether a removed class is recognisable again after a repair."""
        return recognised is not None and recognised > self.config.class_accuracy_target

    def choose_scale(self, max_harm: float) -> ScaleChoice:
        attempts = self.attempts
        return choose_scale(
            attempts.harm,
            attempts.class_accuracy if attempts.has_classes else None,
            max_harm,
            attempts.ceiling,
            self.config.class_accuracy_target,
            self.config.octaves,
            self.config.bisection_steps,
        )

    def run(self, scale: float | str, repair_steps: int | str, count: int) -> Outcome:
        """Subtract (at `scale`, or the automatic one) and repair (`repair_steps` steps, or the
        automatic repair) a request of `count` new ids; the kept attempt's weights are left in place."""
        config, attempts = self.config, self.attempts
        trace: list[tuple[float, float]] = []
        both_auto = scale == "auto" and repair_steps == "auto" and count > 0
        budget = config.harm_budget
        limits = [budget / 2**k for k in range(config.harm_retries + 1)] if both_auto else [budget]
        failed: _Tried | None = None  # the last attempt whose repair failed
        kept: _Tried | None = None  # the last failed attempt that kept the removed classes forgotten
        for attempt, limit in enumerate(limits):
            last = attempt == len(limits) - 1
            chosen = scale
            if scale == "auto":
                choice = self.choose_scale(limit)
                chosen = choice.scale
                trace.extend(choice.trace)
            chosen = float(chosen)
            if failed is not None and chosen >= failed.scale:  # no smaller scale (e.g. the ceiling, or a
                if not last:  # class's fallback scale): no need to repeat that attempt
                    continue
                attempts.restore(failed.weights)
                logger.warning(
                    "forget: no smaller %s gave a smaller scale; the model keeps the attempt at scale "
                    "%.3g, whose repair did not bring the retained rows back. Check it on held-out data.",
                    config.harm_field,
                    failed.scale,
                )
                self._warn_if_class_is_back(failed.recognised, failed.steps)  # measured on these weights
                return Outcome(failed.scale, int(failed.steps), trace)
            attempts.subtract(chosen)
            steps, restored = repair_steps, True
            if repair_steps == "auto":
                steps, restored = attempts.repair() if count else (0, True)
            elif repair_steps:
                attempts.repair_fixed(int(repair_steps))
            recognised = attempts.recognised(steps)
            if self.class_back(recognised) and kept is not None:
                attempts.restore(kept.weights)
                logger.warning(
                    "forget: the repair at scale %.3g brought the removed class back (%.1f %% of its sampled "
                    "training rows classified correctly); the model keeps the earlier attempt at scale %.3g, "
                    "which kept the class forgotten but whose repair did not bring the retained rows back. "
                    "Check it on held-out data.",
                    chosen,
                    recognised,
                    kept.scale,
                )
                return Outcome(kept.scale, int(kept.steps), trace)
            if restored or last:
                if not restored:
                    logger.warning(
                        "forget: the repair did not bring the retained rows back within its budget; the model "
                        "keeps the last attempt (scale %.3g). Check it on held-out data, or call forget again "
                        "on the original weights with config=ForgetConfig(%s=...) smaller, or a fixed "
                        "repair_steps.",
                        chosen,
                        config.harm_field,
                    )
                elif both_auto and self.class_back(recognised):
                    return self._push_class_out(chosen, steps, recognised, trace)
                self._warn_if_class_is_back(recognised, steps)
                return Outcome(chosen, int(steps), trace)
            failed = _Tried(chosen, steps, attempts.keep(), recognised)
            if not self.class_back(recognised):
                kept = failed
            logger.warning(
                "forget: the repair did not bring the retained rows back within its budget at scale %.3g "
                "(%s %.3g); trying again from the original weights with %s %.3g.",
                chosen,
                config.harm_field,
                limit,
                config.harm_field,
                limits[attempt + 1],
            )
        raise AssertionError("unreachable: the last attempt always returns")

    def _push_class_out(self, scale: float, steps: int, recognised: float, trace) -> Outcome:
        """The repair brought the retained rows back, and a removed class with it: try again from the
        original weights at twice the scale, at most `class_retries` times and never above the
        ceiling, and keep the first attempt that leaves the class forgotten (warned if its repair did
        not bring the retained rows back); if none does, keep the first attempt, warned."""
        attempts = self.attempts
        first = _Tried(scale, steps, attempts.keep(), recognised)
        for _ in range(self.config.class_retries):
            if scale >= attempts.ceiling:
                break
            scale = min(2.0 * scale, attempts.ceiling)
            logger.warning(
                "forget: the repair brought the removed class back (%.1f %% of its sampled training rows "
                "classified correctly); trying again from the original weights at scale %.3g.",
                recognised,
                scale,
            )
            attempts.subtract(scale)
            steps, restored = attempts.repair()
            recognised = attempts.recognised(steps)
            if not self.class_back(recognised):
                if not restored:
                    logger.warning(
                        "forget: the model keeps the attempt at scale %.3g, which keeps the class forgotten but "
                        "whose repair did not bring the retained rows back. Check it on held-out data.",
                        scale,
                    )
                return Outcome(scale, int(steps), trace)
        attempts.restore(first.weights)
        self._warn_if_class_is_back(first.recognised, first.steps)
        return Outcome(first.scale, int(first.steps), trace)

    def _warn_if_class_is_back(self, recognised: float | None, repair_steps) -> None:
        if self.class_back(recognised):
            logger.warning(
                "forget: after %d repair steps the model classifies %.1f %% of the removed class's training rows "
                "(a sample of %d) correctly again, more than %g %%: the class is not forgotten. Call forget again "
                "on the original weights with a larger scale (e.g. twice the reported one) or fewer repair_steps, "
                "and check the result.",
                int(repair_steps),
                recognised,
                self.attempts.sampled,
                self.config.class_accuracy_target,
            )

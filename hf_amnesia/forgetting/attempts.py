"""The policy's operations on a live model: subtract at a scale, repair, measure, keep and restore weights."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .config import ForgetConfig
from .measure import Measurer
from .prepare import ForgetData
from .repair import repair_until_restored
from .subtraction import restore, snapshot, subtract_from


class ModelAttempts:
    """`policy.Attempts` on the model's trainable parameters `params`.

    Every subtraction starts from the weights the request found (`original`). `data` is what the
    automatic scale and repair measure on (None when both are fixed); `repair_fixed` fine-tunes
    for a given number of steps.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        params: list[torch.Tensor],
        update: torch.Tensor,
        measure: Measurer,
        data: ForgetData | None,
        config: ForgetConfig,
        ceiling: float,
        args,
        repair_fixed: Callable[[int], None],
    ):
        self.model, self.params, self.update, self.measure = model, params, update, measure
        self.data, self.config, self.ceiling, self.args = data, config, ceiling, args
        self.original = snapshot(params)
        self.has_classes = data is not None and data.class_rows is not None
        self.sampled = 0 if not self.has_classes else len(data.class_rows)
        self.after_subtraction: np.ndarray | None = None  # the forget rows' losses right after the subtraction
        self._base: float | None = None
        self._repair_fixed = repair_fixed

    def _accuracy_at(self, scale: float, rows) -> float:
        subtract_from(self.params, self.original, self.update, scale)
        return self.measure.accuracy(rows)

    def harm(self, scale: float) -> float:
        if self._base is None:  # the original's held-out score
            restore(self.params, self.original)
            self._base = self.measure.score(self.data.holdout, self.config.criterion)
        subtract_from(self.params, self.original, self.update, scale)
        return self._base - self.measure.score(self.data.holdout, self.config.criterion)

    def class_accuracy(self, scale: float) -> float:
        return self._accuracy_at(scale, self.data.class_rows)

    def subtract(self, scale: float) -> None:
        subtract_from(self.params, self.original, self.update, scale)
        if self.data is not None and self.data.forget_rows is not None:  # where the repair holds them
            rows = self.data.forget_rows  # without the cap, no target is capped: no pass over them
            self.after_subtraction = (
                self.measure.row_losses(rows) if self.config.hold_cap else np.full(len(rows), np.inf)
            )

    def repair(self) -> tuple[int, bool]:
        return repair_until_restored(
            self.model, self.data, self.after_subtraction, self.measure, self.args, self.config
        )

    def repair_fixed(self, steps: int) -> None:
        self._repair_fixed(steps)

    def recognised(self, steps: int) -> float | None:
        """Accuracy (%) on the removed classes' sampled training rows after a repair; None when no
        class goes or nothing was repaired. The scale makes a removed class unrecognisable before
        the repair; the repair trains on the other classes only, but may restore enough shared
        features to bring the class back."""
        if not self.has_classes or not steps:
            return None
        return self.measure.accuracy(self.data.class_rows)

    def keep(self) -> list[torch.Tensor]:
        return snapshot(self.params)

    def restore(self, kept: list[torch.Tensor]) -> None:
        restore(self.params, kept)

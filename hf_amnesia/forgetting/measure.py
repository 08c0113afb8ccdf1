"""Measuring a model on rows: logits, per-row losses, accuracy and classifier features (one copy each).

Everything the automatic forget reads of the data goes through `Measurer.predict`, in eval mode,
the same on every process.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import labels_of


def accuracy_points(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent (nan for no rows)."""
    return float(100.0 * np.mean(np.asarray(predicted) == np.asarray(labels))) if len(labels) else float("nan")


def logits_and_labels(model: nn.Module, batch, id_column: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits on a collated batch, and the batch's labels (`labels` or `label`)."""
    batch = dict(batch)
    batch.pop(id_column, None)
    target = batch.pop("labels", None)
    target = batch.pop("label", None) if target is None else target
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return logits_of(out), torch.as_tensor(target)


def logits_of(out) -> torch.Tensor:
    """The logits of a model's output: a dict or `ModelOutput` with `logits`, a tuple, or a tensor."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        return out["logits"]
    return out[0] if isinstance(out, (tuple, list)) else out


class Measurer:
    """Measures `model` on datasets of training-format rows.

    `rows_for_model` turns a dataset into the rows the model takes (the trainer drops the columns
    its forward does not accept); `collate` batches them.
    """

    def __init__(
        self,
        model: nn.Module,
        collate: Callable,
        batch_size: int,
        id_column: str,
        rows_for_model: Callable = lambda dataset: dataset,
    ):
        self.model, self.collate, self.batch_size, self.id_column = model, collate, batch_size, id_column
        self.rows_for_model = rows_for_model

    @torch.no_grad()
    def predict(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (float32, CPU) and labels of every row of `dataset`."""
        was_training = self.model.training
        self.model.eval()
        loader = DataLoader(self.rows_for_model(dataset), batch_size=self.batch_size, collate_fn=self.collate)
        logits, labels = zip(*(logits_and_labels(self.model, batch, self.id_column) for batch in loader))
        self.model.train(was_training)
        return torch.cat(logits).float().cpu(), torch.cat(labels).cpu()

    def accuracy(self, dataset) -> float:
        """Top-1 accuracy (percent) on `dataset`."""
        logits, labels = self.predict(dataset)
        return accuracy_points(logits.argmax(-1).numpy(), labels.numpy())

    def score(self, dataset, criterion: str) -> float:
        """Higher is better: top-1 accuracy (points), or minus the mean cross-entropy (nats) for
        criterion 'loss' (ForgetConfig.criterion)."""
        if criterion == "loss":
            return -float(np.mean(self.row_losses(dataset)))
        return self.accuracy(dataset)

    def row_losses(self, dataset) -> np.ndarray:
        """Cross-entropy of each row of `dataset` (float64)."""
        logits, labels = self.predict(dataset)
        return row_losses(logits, labels)

    def features(self, dataset) -> tuple[np.ndarray | None, np.ndarray]:
        """Each row's input to the model's classifier layer (its last nn.Linear), and the labels;
        None instead of the features when that input is not one vector per row."""
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            return None, labels_of(dataset)
        captured: list[torch.Tensor] = []
        hook = linears[-1].register_forward_hook(lambda module, args, out: captured.append(args[0].detach()))
        try:
            logits, labels = self.predict(dataset)
        finally:
            hook.remove()
        if any(c.dim() != 2 for c in captured) or sum(len(c) for c in captured) != len(labels):
            return None, labels.numpy()
        return torch.cat(captured).float().cpu().numpy(), labels.numpy()


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Cross-entropy of each row, from its logits and label (float64)."""
    return nn.functional.cross_entropy(logits, labels.long(), reduction="none").double().numpy()

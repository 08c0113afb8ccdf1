"""Measuring a model on rows: logits, per-row losses, accuracy and classifier features (one copy each).

Everything the automatic forget measures goes through `Measurer.batches`, in eval mode, the same
on every process (the repair's hold computes its forget rows' losses in train mode, with
`row_losses_of`). A row is a class label (a classifier) or a sequence whose `labels` hold one token
each (a language model, -100 where nothing is predicted): a sequence's loss is its mean over its
predicted tokens, and it has no accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import labels_of, random_streams_kept


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
        shift_labels: bool = False,
    ):
        self.model, self.collate, self.batch_size, self.id_column = model, collate, batch_size, id_column
        self.rows_for_model, self.shift_labels = rows_for_model, shift_labels

    @torch.no_grad()
    def batches(self, dataset) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Logits and labels of `dataset`, a batch at a time, in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            loader = DataLoader(self.rows_for_model(dataset), batch_size=self.batch_size, collate_fn=self.collate)
            for batch in loader:
                yield logits_and_labels(self.model, batch, self.id_column)
        finally:
            self.model.train(was_training)

    def predict(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (float32, CPU) and labels of every row of `dataset` (a classifier's: a language
        model's logits of every token would not fit; `evaluate` measures those a batch at a time)."""
        logits, labels = zip(*((logits.float().cpu(), labels.cpu()) for logits, labels in self.batches(dataset)))
        return torch.cat(logits), torch.cat(labels)

    def evaluate(self, dataset) -> tuple[np.ndarray, np.ndarray | None]:
        """Each row's loss (float64) and whether the model classifies it correctly (None for
        sequences, which have no accuracy), measured a batch at a time."""
        losses, correct = [], []
        for logits, labels in self.batches(dataset):
            labels = labels.to(logits.device)
            losses.append(row_losses_of(logits, labels, self.shift_labels).double().cpu().numpy())
            if not is_sequence(logits, labels):
                correct.append((logits.argmax(-1) == labels).cpu().numpy())
        return np.concatenate(losses), np.concatenate(correct) if correct else None

    def sequence_rows(self, dataset) -> bool:
        """Whether `dataset`'s rows, as collated for the model, carry integer labels of a token per
        position (a language model's, made by the dataset or by the collator) rather than one class
        per row."""
        if dataset is None or not len(dataset):
            return False
        with random_streams_kept():  # a random transform or collator must not move training's draws
            batch = dict(self.collate([self.rows_for_model(dataset)[0]]))
        labels = batch.get("labels", batch.get("label"))
        return torch.is_tensor(labels) and labels.dim() == 2 and not labels.is_floating_point()

    def accuracy(self, dataset) -> float:
        """Top-1 accuracy (percent) on `dataset`."""
        _, correct = self.evaluate(dataset)
        if correct is None:
            raise ValueError("accuracy needs one class label per row; sequences are measured by their loss.")
        return float(100.0 * np.mean(correct)) if len(correct) else float("nan")

    def score(self, dataset, criterion: str) -> float:
        """Higher is better: top-1 accuracy (points), or minus the mean per-row loss (nats) for
        criterion 'loss' (ForgetConfig.criterion)."""
        if criterion == "loss":
            return -float(np.mean(self.row_losses(dataset)))
        return self.accuracy(dataset)

    def row_losses(self, dataset) -> np.ndarray:
        """Cross-entropy of each row of `dataset` (float64; a sequence's mean over its tokens)."""
        return self.evaluate(dataset)[0]

    def features(self, dataset) -> tuple[np.ndarray | None, np.ndarray]:
        """Each row's input to the model's classifier layer (its last nn.Linear), and the labels;
        None instead of the features when that input is not one vector per row."""
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            return None, labels_of(dataset)
        captured: list[torch.Tensor] = []
        hook = linears[-1].register_forward_hook(lambda module, args, out: captured.append(args[0].detach().cpu()))
        try:
            labels = torch.cat([labels.cpu() for _, labels in self.batches(dataset)])
        finally:
            hook.remove()
        if any(c.dim() != 2 for c in captured) or sum(len(c) for c in captured) != len(labels):
            return None, labels.numpy()
        return torch.cat(captured).float().numpy(), labels.numpy()


def is_sequence(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether the labels hold one integer token per position (B x T against B x T x V logits)."""
    return (
        labels.dim() == 2 and logits.dim() == 3 and logits.shape[:2] == labels.shape and not labels.is_floating_point()
    )


def row_losses_of(logits: torch.Tensor, labels: torch.Tensor, shift_labels: bool = False) -> torch.Tensor:
    """Each row's cross-entropy (float32, differentiable): a class label's, or a sequence's mean over
    its predicted tokens (labels -100 predict nothing; a row that predicts none has loss 0). With `shift_labels`
    (a causal LM) position t's logits predict token t+1, as the model's own loss does."""
    if not is_sequence(logits, labels):
        return nn.functional.cross_entropy(logits.float(), labels.long(), reduction="none")
    logits, labels = _predicted(logits, labels.long(), shift_labels)
    tokens = nn.functional.cross_entropy(logits.float().transpose(1, -1), labels, ignore_index=-100, reduction="none")
    counted = (labels != -100).reshape(len(labels), -1).sum(dim=1)
    return tokens.reshape(len(labels), -1).sum(dim=1) / counted.clamp(min=1)


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, shift_labels: bool = False, smoother=None) -> torch.Tensor:
    """A batch's training loss as the model computes it: the mean over the batch's rows, or over its
    predicted tokens for sequences; `smoother` is a `LabelSmoother` to smooth the labels with."""
    if smoother is not None:
        return smoother({"logits": logits}, labels, shift_labels=shift_labels and is_sequence(logits, labels))
    if not is_sequence(logits, labels):
        return nn.functional.cross_entropy(logits, labels.long())
    logits, labels = _predicted(logits, labels, shift_labels)
    flat = logits.float().reshape(-1, logits.shape[-1])
    return nn.functional.cross_entropy(flat, labels.long().reshape(-1), ignore_index=-100)


def _predicted(logits: torch.Tensor, labels: torch.Tensor, shift_labels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's logits and the tokens they predict: shifted by one for a causal LM."""
    return (logits[:, :-1], labels[:, 1:]) if shift_labels else (logits, labels)

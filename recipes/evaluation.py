"""How unlearning is judged: UA, RA, TA, MIA-efficacy, loss AUC, Avg. Gap to Retrain, RTE, sizes, plots.

Definitions follow the field's protocol (SalUn, ICLR 2024; "Model Sparsity Can Simplify Machine
Unlearning", NeurIPS 2023); see docs/evaluation.md. Rates are in percent. scikit-learn does the
attacks; matplotlib draws the plots.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

GAP_METRICS = ("ua", "ra", "ta", "mia")
# The per-row loss AUC in place of the population SVC attack, which can flip and overstate
# forgetting (Hayes et al., SaTML 2025).
ROBUST_GAP_METRICS = ("ua", "ra", "ta", "mia_auc")


@torch.no_grad()
def predict_proba(
    model: nn.Module, dataset, batch_size: int = 256, label_column: str = "labels"
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and labels of every row (the model is put in eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        labels.append(np.asarray(batch.pop(label_column)))
        inputs = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v) and k != "dataset_id"}
        out = model(**inputs)
        logits = out["logits"] if isinstance(out, Mapping) else out.logits
        probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(probs), np.concatenate(labels)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent (nan for an empty set)."""
    if len(labels) == 0:
        return float("nan")
    return float(100.0 * np.mean(np.argmax(probs, axis=1) == labels))


def true_label_confidence(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return probs[np.arange(len(labels)), labels.astype(int)]


def mia_efficacy(retain_conf: np.ndarray, test_conf: np.ndarray, forget_conf: np.ndarray, seed: int = 0) -> float:
    """Percent of forget samples an SVC attack calls non-members.

    The attack is `SVC(C=3, gamma="auto", kernel="rbf")` on the true-label probability, trained on
    as many retained training samples as there are test samples (members, label 1) versus the
    test samples (non-members, label 0). Higher means more forgotten; compare with Retrain's value.
    """
    from sklearn.svm import SVC

    rng = np.random.default_rng(seed)
    n = min(len(test_conf), len(retain_conf))
    members = retain_conf[rng.choice(len(retain_conf), size=n, replace=False)]
    non_members = test_conf[rng.choice(len(test_conf), size=n, replace=False)]
    features = np.concatenate([members, non_members]).reshape(-1, 1)
    target = np.concatenate([np.ones(n), np.zeros(n)])
    attack = SVC(C=3, gamma="auto", kernel="rbf").fit(features, target)
    return float(100.0 * np.mean(attack.predict(forget_conf.reshape(-1, 1)) == 0))


def loss_attack_accuracy(forget_loss: np.ndarray, test_loss: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated accuracy (percent) of telling forget losses (1) from test losses (0).

    `LogisticRegression` with stratified k-fold CV on equal-size sets; about 50 means the attack
    cannot tell forgotten samples from unseen ones. NaN when either set has fewer than 2 rows.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    rng = np.random.default_rng(seed)
    n = min(len(forget_loss), len(test_loss))
    if n < 2:
        return float("nan")  # one sample per side cannot be cross-validated
    features = np.concatenate(
        [
            forget_loss[rng.choice(len(forget_loss), n, replace=False)],
            test_loss[rng.choice(len(test_loss), n, replace=False)],
        ]
    ).reshape(-1, 1)
    target = np.concatenate([np.ones(n), np.zeros(n)])
    folds = max(2, min(folds, n))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(100.0 * cross_val_score(LogisticRegression(), features, target, cv=cv).mean())


def mia_auc(forget_loss: np.ndarray, test_loss: np.ndarray) -> float:
    """AUC (percent) of telling forget rows from test rows by their per-row loss, lower loss = member.

    50 means the losses cannot tell them apart, 100 that every forget row has a lower loss than
    every test row (ties count half). A threshold-free per-sample check, compared with Retrain's
    value (for memorised rows that Retrain never saw it lies below 50). NaN when either set is empty.
    """
    from sklearn.metrics import roc_auc_score

    if len(forget_loss) == 0 or len(test_loss) == 0:
        return float("nan")
    target = np.concatenate([np.ones(len(forget_loss)), np.zeros(len(test_loss))])
    score = -np.concatenate([forget_loss, test_loss])  # lower loss scores higher as a member
    return float(100.0 * roc_auc_score(target, score))


def cross_entropy(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(true_label_confidence(probs, labels), 1e-12, None))


def avg_gap(method: Mapping[str, float], retrain: Mapping[str, float]) -> float:
    """Mean of |method - retrain| over UA, RA, TA and MIA-efficacy."""
    return float(np.mean([abs(method[m] - retrain[m]) for m in GAP_METRICS]))


def avg_gap_robust(method: Mapping[str, float], retrain: Mapping[str, float]) -> float:
    """Mean of |method - retrain| over UA, RA, TA and the loss AUC (`mia_auc`)."""
    return float(np.mean([abs(method[m] - retrain[m]) for m in ROBUST_GAP_METRICS]))


def relative_distance(
    theta: torch.Tensor, reference: torch.Tensor, theta_orig: torch.Tensor, theta_init: torch.Tensor
) -> float:
    """||theta - reference|| / ||theta_orig - theta_init||: a distance in units of the training change."""
    return float((theta - reference).norm() / (theta_orig - theta_init).norm())


def rte_speedup(retrain_seconds: float, method_seconds: float) -> float:
    """How many times faster than retraining a method is (run-time efficiency)."""
    return float(retrain_seconds / max(method_seconds, 1e-12))


def unlearning_metrics(
    model: nn.Module,
    forget_set,
    retain_set,
    test_set,
    label_column: str = "labels",
    seed: int = 0,
) -> dict[str, float]:
    """UA, RA, TA, MIA-efficacy, the loss attack and the loss AUC of one model (percent).

    For class forgetting pass as `test_set` only the test rows of the remaining classes.
    """
    forget_p, forget_y = predict_proba(model, forget_set, label_column=label_column)
    retain_p, retain_y = predict_proba(model, retain_set, label_column=label_column)
    test_p, test_y = predict_proba(model, test_set, label_column=label_column)
    forget_loss, test_loss = cross_entropy(forget_p, forget_y), cross_entropy(test_p, test_y)
    return {
        "ua": 100.0 - accuracy(forget_p, forget_y),
        "ra": accuracy(retain_p, retain_y),
        "ta": accuracy(test_p, test_y),
        "mia": mia_efficacy(
            true_label_confidence(retain_p, retain_y),
            true_label_confidence(test_p, test_y),
            true_label_confidence(forget_p, forget_y),
            seed=seed,
        ),
        "loss_attack": loss_attack_accuracy(forget_loss, test_loss, seed=seed),
        "mia_auc": mia_auc(forget_loss, test_loss),
    }


def plot_results(results: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | os.PathLike) -> None:
    """One panel per scenario: Avg. Gap to Retrain of every method (lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(results)
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 4.5), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        methods = [m for m in results[scenario] if m != "retrain"]
        gaps = [results[scenario][m]["avg_gap"] for m in methods]
        ax.barh(methods, gaps, color=["tab:green" if m.startswith("hf_amnesia") else "tab:gray" for m in methods])
        ax.set_title(f"{scenario}: Avg. Gap to Retrain")
        ax.set_xlabel("percentage points (lower is better)")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TABLE_METRICS = (
    "ua",
    "ra",
    "ta",
    "mia",
    "mia_auc",
    "avg_gap",
    "avg_gap_robust",
    "seconds",
    "storage_bytes",
    "dist_original",
    "dist_retrain",
)
# Columns shown only where some row has them (runs from before they were measured lack them).
OPTIONAL_METRICS = ("mia_auc", "avg_gap_robust")


def table_columns(rows, candidates=TABLE_METRICS) -> list[str]:
    """`candidates` less the `OPTIONAL_METRICS` that none of `rows` (metric -> value mappings) has."""
    rows = list(rows)
    return [m for m in candidates if m not in OPTIONAL_METRICS or any(m in row for row in rows)]


def markdown_table(results: Mapping[str, Mapping[str, Mapping[str, float]]], metrics=None) -> str:
    """results[scenario][method][metric] as one markdown table."""
    metrics = metrics or table_columns(row for methods in results.values() for row in methods.values())
    lines = ["| scenario | method | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for scenario, methods in results.items():
        for method, values in methods.items():
            cells = [_fmt(values.get(m)) for m in metrics]
            lines.append(f"| {scenario} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"

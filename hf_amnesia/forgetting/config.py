"""`ForgetConfig`: every constant of the automatic forget policy, as a documented field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from ..errors import ForgetRequestError

CRITERIA = ("auto", "accuracy", "loss")


@dataclass(frozen=True)
class ForgetConfig:
    """How `forget(ids)` chooses its scale and repair (docs/method.md, "The forget policy, step by step").

    Pass it as `trainer.forget(ids, config=ForgetConfig(max_harm=20.0))`. The defaults are the
    measured policy of docs/results.md; the switches `weight_by_kept_share`, `hold_unseen`,
    `hold_cap`, `hold_until_met` and `neighbour_vote` turn off one part each, for ablations and baselines.
    """

    max_harm: float = field(
        default=40.0,
        metadata={
            "help": "Accuracy points, on held-out rows of the classes the request keeps, that the automatic "
            "scale may cost (0 <= max_harm < 100)."
        },
    )
    criterion: str = field(
        default="auto",
        metadata={
            "choices": CRITERIA,
            "help": "What the automatic scale and repair measure: `accuracy` (held-out accuracy points lost, up to "
            "max_harm; the repair ends when the retained rows' accuracy is back) or `loss` (held-out mean "
            "cross-entropy gained, up to max_loss_harm nats; the repair ends when the retained rows' mean loss is "
            "back at the original's). `auto`: accuracy for rows of one class label, "
            "loss for sequences (a language model's labels, a token per position; a row's loss is its mean over "
            "its tokens).",
        },
    )
    max_loss_harm: float = field(
        default=1.0,
        metadata={
            "help": "With criterion='loss': nats of mean cross-entropy, on held-out rows of the classes the request "
            "keeps, that the automatic scale may add (> 0)."
        },
    )
    ceiling_factor: float = field(
        default=4.0,
        metadata={
            "help": "The scale search tops out at ceiling_factor / sqrt(keep_fraction): 1 / sqrt(p) gives the kept "
            "entries the norm of the request's whole change, the factor leaves room above it."
        },
    )
    octaves: int = field(
        default=10, metadata={"help": "The scale search starts this many octaves (halvings) below the ceiling."}
    )
    bisection_steps: int = field(
        default=7, metadata={"help": "Bisection steps on log2(scale): resolution octaves / 2**bisection_steps."}
    )
    repair_share: float = field(
        default=0.1,
        metadata={"help": "The automatic repair runs for at most this share of the training's optimizer steps."},
    )
    repair_checks: int = field(
        default=10, metadata={"help": "How many times per budget the repair checks whether it is done."}
    )
    retained_sample_rows: int = field(
        default=1024,
        metadata={
            "help": "Retained rows (a seeded sample) whose accuracy decides when the repair is done; a removed "
            "class's training rows are sampled to the same size to check that it stays forgotten."
        },
    )
    class_accuracy_target: float = field(
        default=1.0,
        metadata={"help": "A removed class counts as forgotten at most at this accuracy (%) on its training rows."},
    )
    harm_retries: int = field(
        default=3,
        metadata={
            "help": "Halvings of max_harm (max_loss_harm with criterion='loss') tried, each from the original "
            "weights, when the repair cannot mend a subtraction within its budget."
        },
    )
    class_retries: int = field(
        default=3,
        metadata={
            "help": "Doublings of the scale tried, each from the original weights, when a repair that mended the "
            "subtraction brought a removed class back."
        },
    )
    neighbours: int = field(
        default=10,
        metadata={
            "help": "Retained rows that vote on whether a forget row's label is supported by the rest of the data."
        },
    )
    neighbour_rows: int = field(
        default=20000, metadata={"help": "At most this many retained rows (a seeded sample) are candidate neighbours."}
    )
    weight_by_kept_share: bool = field(
        default=True,
        metadata={
            "help": "Weight each tensor of the automatic subtraction by the inverse of the share of its rows a sample "
            "keeps (False: the raw stored sum)."
        },
    )
    hold_unseen: bool = field(
        default=True,
        metadata={
            "help": "Unless whole classes go, the automatic repair holds the forget rows no better fitted than "
            "held-out rows of their rank (False: a plain repair on the retained rows)."
        },
    )
    hold_cap: bool = field(
        default=True,
        metadata={
            "help": "The hold lets no forget row fit worse than the subtraction left it: its target is "
            "min(a_i, h_q(i)) "
            "(False: h_q(i) alone, the held-out loss at its rank; with scale=0.0 that is the repair with nothing "
            "subtracted, the store-free twin of forget)."
        },
    )
    hold_until_met: bool = field(
        default=True,
        metadata={
            "help": "A repair that holds forget rows ends only when their mean loss has also reached their "
            "targets' mean (False: it ends as soon as the retained rows are back)."
        },
    )
    neighbour_vote: bool = field(
        default=True,
        metadata={
            "help": "Hold forget rows whose nearest retained rows outvote their label at a misclassified held-out "
            "row's loss (False: no such hold)."
        },
    )

    def __post_init__(self):
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            kind = {"bool": bool, "int": int, "str": str}.get(getattr(f.type, "__name__", f.type), float)
            if kind is str:
                ok = isinstance(value, str) and value in f.metadata["choices"]
            elif kind is bool:
                ok = isinstance(value, bool)
            elif kind is int:
                ok = (
                    isinstance(value, int)
                    and not isinstance(value, bool)
                    and value >= (0 if "retries" in f.name else 1)
                )
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok:
                problems.append(f"{f.name}={value!r} must be {_wanted(f.name, kind)}")
        if not problems:
            if not 0 <= self.max_harm < 100:
                problems.append(f"max_harm must be a number of accuracy points in [0, 100), got {self.max_harm!r}")
            for name in ("ceiling_factor", "repair_share", "max_loss_harm"):
                if getattr(self, name) <= 0:
                    problems.append(f"{name} must be > 0, got {getattr(self, name)!r}")
            if not 0 <= self.class_accuracy_target < 100:
                problems.append(f"class_accuracy_target must be in [0, 100), got {self.class_accuracy_target!r}")
        if problems:
            raise ForgetRequestError("ForgetConfig: " + "; ".join(problems) + ".")

    def resolved(self, sequences: bool) -> ForgetConfig:
        """This config with criterion `auto` replaced by what the rows call for: `loss` for
        sequences, `accuracy` for class labels."""
        if self.criterion != "auto":
            return self
        return replace(self, criterion="loss" if sequences else "accuracy")

    @property
    def harm_field(self) -> str:
        """The field that bounds the automatic scale's harm under this criterion."""
        return "max_loss_harm" if self.criterion == "loss" else "max_harm"

    @property
    def harm_budget(self) -> float:
        """The harm the automatic scale may cost: max_loss_harm nats or max_harm accuracy points."""
        return getattr(self, self.harm_field)

    def scale_ceiling(self, keep_fraction: float) -> float:
        """Largest scale the search tries: ceiling_factor / sqrt(p) (4 at p = 1, 40 at p = 1 %)."""
        return self.ceiling_factor / math.sqrt(keep_fraction)

    def repair_budget(self, planned_training_steps: int) -> int:
        """Most optimizer steps an automatic repair may take: repair_share of training, at least 1."""
        return max(1, math.ceil(self.repair_share * planned_training_steps))

    def repair_check_every(self, budget: int) -> int:
        """How often (in steps) the automatic repair checks whether it is done."""
        return max(1, budget // self.repair_checks)


def _wanted(name: str, kind: type) -> str:
    if kind is str:
        return f"one of {list(ForgetConfig.__dataclass_fields__[name].metadata['choices'])}"
    if kind is bool:
        return "True or False"
    if kind is int:
        return "a non-negative integer" if "retries" in name else "a positive integer"
    return "a finite number"

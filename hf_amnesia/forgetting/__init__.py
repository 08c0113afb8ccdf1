"""Forgetting: serve a request to forget dataset ids, driven by one policy object (`ForgetConfig`).

    request.py      the ids, the choices, the report
    record.py       which ids a model has forgotten (the store's lineage), the record it carries
    subtraction.py  a request's stored deltas as one dense change; weight snapshots
    measure.py      logits, per-row losses, accuracy and features of a model on rows
    scale.py        the scale search (pure)
    hold.py         what the repair measures and holds (pure)
    config.py       ForgetConfig: every constant of the policy, documented
    policy.py       which subtraction to keep, given ways to try one (pure)
    prepare.py      the data the automatic choice measures on, checked before any change
    repair.py       the repair: a plain `transformers.Trainer` fine-tune with a `compute_loss_func`
    attempts.py     the policy's operations on a live model
    serve.py        one request top to bottom: checks, policy, the committed transaction

Only `repair.py` knows `transformers`; the trainer builds a `serve.ForgetContext` and calls `serve`.
"""

from .config import ForgetConfig
from .measure import Measurer
from .policy import ForgetPolicy, Outcome
from .prepare import ForgetData
from .record import Standing, model_record, standing
from .repair import finetune
from .request import ForgetReport, normalize_ids
from .serve import ForgetContext, serve
from .subtraction import apply_update, forget_update, kept_share_weights

__all__ = [
    "ForgetConfig",
    "ForgetContext",
    "ForgetData",
    "ForgetPolicy",
    "ForgetReport",
    "Measurer",
    "Outcome",
    "Standing",
    "apply_update",
    "finetune",
    "forget_update",
    "kept_share_weights",
    "model_record",
    "normalize_ids",
    "serve",
    "standing",
]

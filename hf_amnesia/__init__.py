"""hf_amnesia: per-sample amnesiac unlearning for Hugging Face training."""

from .config import AmnesiaConfig
from .data import ids_of_label
from .errors import (
    AmnesiaError,
    ConfigError,
    ForgetIncompleteError,
    ForgetRequestError,
    ModelLineageError,
    StoreError,
    UnsupportedModelError,
    UnsupportedOptimizerError,
    UnsupportedTrainingError,
)
from .forgetting import ForgetConfig, ForgetReport
from .planning import RecordingPlan, plan
from .store import StoreReader
from .trainer import AmnesiacTrainer, influence_holders, last_complete_checkpoint
from .version import __version__

__all__ = [
    "AmnesiaConfig",
    "AmnesiaError",
    "AmnesiacTrainer",
    "ConfigError",
    "ForgetConfig",
    "ForgetIncompleteError",
    "ForgetReport",
    "ForgetRequestError",
    "ModelLineageError",
    "RecordingPlan",
    "StoreError",
    "StoreReader",
    "UnsupportedModelError",
    "UnsupportedOptimizerError",
    "UnsupportedTrainingError",
    "__version__",
    "ids_of_label",
    "influence_holders",
    "last_complete_checkpoint",
    "plan",
]

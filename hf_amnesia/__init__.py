"""hf_amnesia: per-sample amnesiac unlearning for Hugging Face training."""

__version__ = "0.1.0"

from .config import AmnesiaConfig  # noqa: E402
from .data import ids_of_label  # noqa: E402
from .errors import (  # noqa: E402
    AmnesiaError,
    ConfigError,
    ForgetRequestError,
    StoreError,
    UnsupportedModelError,
    UnsupportedOptimizerError,
    UnsupportedTrainingError,
)
from .forget import ForgetReport  # noqa: E402
from .store import StoreReader  # noqa: E402
from .trainer import AmnesiacTrainer, influence_holders, last_complete_checkpoint  # noqa: E402

__all__ = [
    "AmnesiaConfig",
    "AmnesiaError",
    "AmnesiacTrainer",
    "ConfigError",
    "ForgetReport",
    "ForgetRequestError",
    "StoreError",
    "StoreReader",
    "UnsupportedModelError",
    "UnsupportedOptimizerError",
    "UnsupportedTrainingError",
    "__version__",
    "ids_of_label",
    "influence_holders",
    "last_complete_checkpoint",
]

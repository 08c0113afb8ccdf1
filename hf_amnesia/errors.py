"""Typed errors. Each message says what went wrong and what to do about it."""


class AmnesiaError(Exception):
    """Base class of every error raised by hf_amnesia."""


class ConfigError(AmnesiaError, ValueError):
    """A setting of `AmnesiaConfig` is out of range or conflicts with an existing store."""


class UnsupportedModelError(AmnesiaError):
    """The model contains a layer or setting whose per-sample updates cannot be recorded exactly."""


class UnsupportedOptimizerError(AmnesiaError):
    """The optimizer is not one whose updates can be split exactly per sample (Adam / AdamW)."""


class UnsupportedTrainingError(AmnesiaError):
    """The training setup (parallelism, checkpointing, data) cannot be recorded exactly."""


class StoreError(AmnesiaError):
    """The on-disk store is missing, damaged or belongs to another model."""


class ForgetRequestError(AmnesiaError, ValueError):
    """The ids given to `forget` are malformed, or `strict=True` found unknown ids."""


class ModelLineageError(StoreError):
    """The model's weights are not ones the store serves: not its run's final weights, nor weights
    a forget made from them."""


class ForgetIncompleteError(AmnesiaError):
    """A forget request was committed but not finished; `hf-amnesia recover STORE` finishes it."""

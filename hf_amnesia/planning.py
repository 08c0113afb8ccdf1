"""What recording a training run will cost, before it starts: `plan(model, ...)`.

    from hf_amnesia import plan
    print(plan(model, num_rows=50_000, batch_size=32, epochs=3))

The figures follow the recorder's own rules: the layout's real K, the open momentum tails'
bound (`attribution.open_tail_bound`) at the steps the memory budget allows, the dense per-step
vectors, and the bytes each step copies off the training device. `hf-amnesia plan MODEL` prints
the same for a model config or folder. With `timing_dataset`, a few steps are timed with and
without recording for an overhead figure.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from torch import nn

from .attribution import MomentumLedger, bounded_steps, open_tail_bound
from .config import DEFAULT_KEEP_FRACTION, DEFAULT_KEEP_LAYOUT
from .errors import ConfigError
from .layout import ParamLayout
from .recording import AUTO_SUMS_BYTES, default_store_dtype
from .store import KEEP_LAYOUTS, STORE_DTYPES, Manifest

ROW_OVERHEAD = 8 + 4  # bytes per stored row besides its values: the int64 id and the uint32 checksum


@dataclass(frozen=True)
class RecordingPlan:
    """Per process unless said otherwise; bytes."""

    num_params: int  # trainable entries M
    k: int  # entries kept per sample
    store_dtype: str
    steps: int  # optimizer steps of the run
    window: int  # steps an exact tail stays open
    open_steps: int  # steps the tails stay open in this run (bounded below the window by the budget)
    bounded: bool  # some tails closed early, their rest estimated (docs/limits.md)
    over_budget: bool  # one step's tails alone exceed tail_memory_budget_mb (the tails take one step)
    store_bytes: int  # the store's rows, every process together: num_rows * (K * value bytes + 12)
    tail_memory_bytes: int  # the open tails at their peak, on the training device
    dense_bytes: int  # the float64 ledger and the float32 step weights (M-sized), on the training device
    sums_bytes: int  # `sum_deltas_in_memory`: per-row sums on the training device (0 without)
    transfer_bytes_per_step: int  # float32 deltas copied to the host and written per step (0 with sums)
    overhead_estimate: float | None = None  # recording / plain median step time, when timed

    def __str__(self) -> str:
        mib = 2**20
        mode = f"bounded: closed after {self.open_steps} of {self.window} steps" if self.bounded else "exact"
        if self.over_budget:
            mode += "; one step alone exceeds tail_memory_budget_mb"
        lines = [
            f"trainable entries     {self.num_params:,} (K = {self.k:,} kept per sample, {self.store_dtype})",
            f"store on disk         {self.store_bytes / mib:,.1f} MiB",
            f"open momentum tails   {self.tail_memory_bytes / mib:,.1f} MiB ({mode}, {self.steps:,} steps)",
            f"dense per-step state  {self.dense_bytes / mib:,.1f} MiB",
            f"per-sample sums       {self.sums_bytes / mib:,.1f} MiB",
            f"copied off per step   {self.transfer_bytes_per_step / mib:,.2f} MiB",
        ]
        if self.overhead_estimate is not None:
            lines.append(f"step time overhead    {self.overhead_estimate:.2f}x (timed, first steps)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return asdict(self)


def plan(
    model: nn.Module,
    num_rows: int,
    batch_size: int,
    epochs: float = 1.0,
    keep_fraction: float = DEFAULT_KEEP_FRACTION,
    keep_layout: str = DEFAULT_KEEP_LAYOUT,
    store_dtype: str | None = None,
    gradient_accumulation_steps: int = 1,
    num_processes: int = 1,
    beta1: float = 0.9,
    tail_tolerance: float = 1e-7,
    tail_memory_budget_mb: float = 1024.0,
    sum_deltas_in_memory: bool | None = None,
    timing_dataset=None,
    timing_steps: int = 12,
) -> RecordingPlan:
    """The cost of recording `model`'s training on `num_rows` rows, `batch_size` per process and
    microbatch, as `AmnesiaConfig` with the same settings would record it (`model` may live on
    the meta device: only its trainable parameters' shapes are read). `timing_dataset` (rows the
    model trains on, with labels) adds `overhead_estimate`, from `timing_steps` steps each way."""
    if keep_layout not in KEEP_LAYOUTS:
        raise ConfigError(f"keep_layout must be one of {list(KEEP_LAYOUTS)}, got {keep_layout!r}.")
    store_dtype = store_dtype or default_store_dtype(model)
    if store_dtype not in STORE_DTYPES:
        raise ConfigError(f"store_dtype must be one of {sorted(STORE_DTYPES)}, got {store_dtype!r}.")
    counts = (num_rows, batch_size, gradient_accumulation_steps, num_processes)
    if not 0.0 < keep_fraction <= 1.0 or min(counts) < 1 or epochs <= 0 or not 0 < tail_memory_budget_mb < math.inf:
        raise ConfigError(
            "plan needs 0 < keep_fraction <= 1, num_rows, batch_size, gradient_accumulation_steps and num_processes "
            f">= 1, epochs > 0 and a positive, finite tail_memory_budget_mb; got keep_fraction={keep_fraction}, "
            f"num_rows={num_rows}, batch_size={batch_size}, gradient_accumulation_steps={gradient_accumulation_steps}, "
            f"num_processes={num_processes}, epochs={epochs}, tail_memory_budget_mb={tail_memory_budget_mb}."
        )
    layout = ParamLayout.from_model(model)
    manifest = Manifest(
        layout=layout, keep_fraction=float(keep_fraction), dtype=store_dtype, seed=0, keep_layout=keep_layout
    )
    k, m = manifest.k, layout.num_params
    per_step = batch_size * gradient_accumulation_steps
    steps = math.ceil(epochs * math.ceil(num_rows / (per_step * num_processes)))
    window = MomentumLedger(1, beta1, tail_tolerance, "meta").window
    bound = bounded_steps(tail_memory_budget_mb * 2**20, per_step, k, m, window)
    open_steps = min(bound or window, steps)
    value_bytes = 4 if store_dtype == "float32" else 2
    rows_per_process = num_rows  # each process sums every training row's id
    if sum_deltas_in_memory is None:  # as the trainer decides for a datasets.Dataset
        sum_deltas_in_memory = rows_per_process * k * 4 <= AUTO_SUMS_BYTES
    result = RecordingPlan(
        num_params=m,
        k=k,
        store_dtype=store_dtype,
        steps=steps,
        window=window,
        open_steps=open_steps,
        bounded=bound is not None and steps > bound,  # some tail closes before training ends
        store_bytes=num_rows * (k * value_bytes + ROW_OVERHEAD),
        tail_memory_bytes=open_tail_bound(open_steps, per_step, k, m),
        over_budget=open_tail_bound(1, per_step, k, m) > tail_memory_budget_mb * 2**20,
        dense_bytes=m * (8 + 4 + (4 if bound is not None else 0)),
        sums_bytes=rows_per_process * k * 4 if sum_deltas_in_memory else 0,
        transfer_bytes_per_step=0 if sum_deltas_in_memory else per_step * k * 4,
    )
    if timing_dataset is None:
        return result
    ratio = _timed_overhead(model, timing_dataset, batch_size, timing_steps, keep_fraction, keep_layout, store_dtype)
    return RecordingPlan(**{**result.to_json(), "overhead_estimate": ratio})


def _timed_overhead(model, dataset, batch_size, steps, keep_fraction, keep_layout, store_dtype) -> float:
    """Median step time with recording over that without, on copies of `model` (the first two
    steps of each left out). Only the first steps are timed: before the momentum tails close."""
    import copy
    import tempfile
    import time

    from transformers import TrainerCallback

    from .config import AmnesiaConfig
    from .trainer import AmnesiacTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.began = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.began)

    medians = {}
    for record in (False, True):
        with tempfile.TemporaryDirectory() as out:
            timer = Timer()
            args = AmnesiaConfig(
                output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps, report_to=[],
                save_strategy="no", disable_tqdm=True, logging_strategy="no", keep_fraction=keep_fraction,
                keep_layout=keep_layout, store_dtype=store_dtype,
            )  # fmt: skip
            trainer = AmnesiacTrainer(
                model=copy.deepcopy(model), args=args, train_dataset=dataset, callbacks=[timer], record=record
            )
            trainer.train()
            medians[record] = statistics.median(timer.times[2:] or timer.times)
    return medians[True] / medians[False]


def meta_model(name_or_path: str, lora_r: int = 0, lora_target_modules: list[str] | None = None) -> nn.Module:
    """The model of a config (a folder with config.json, or a hub name) on the meta device: its
    parameters' shapes without their memory. The class is the config's first `architectures`
    entry (save_pretrained writes it), else the base model of `AutoModel`; with `lora_r`, a LoRA of that rank on
    `lora_target_modules` (peft), whose adapters are then the trainable parameters."""
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot read a model config from {name_or_path!r} ({err}); give a folder holding config.json "
            "(save_pretrained writes one) or a model name the hub (or its cache) has."
        ) from None
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        model = model_class(config) if model_class is not None else transformers.AutoModel.from_config(config)
        if lora_r:
            import peft

            lora = peft.LoraConfig(r=lora_r, target_modules=lora_target_modules or None)
            model = peft.get_peft_model(model, lora)
    return model

"""Opening the store for a recording run: the store's lock, held for the whole run (`hold_store`);
its manifest, made from the config or checked against it (`open_manifest`); what the run will cost.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from torch import nn

from .attribution import open_tail_bound
from .config import DEFAULT_KEEP_FRACTION, DEFAULT_KEEP_LAYOUT, DEFAULT_KEEP_SEED, DEFAULT_STORE_DTYPE, AmnesiaConfig
from .errors import ConfigError, StoreError
from .layout import ParamLayout
from .store import Manifest, recording_marker
from .store.journal import store_lock, weights_fingerprint
from .validate import nothing_to_record, raise_problems

TRAINING = "training run"  # what a recording run holds the store's lock for


def make_store_folder(store_dir: Path) -> None:
    """Create the store's folder (mode 0700) if it is not there."""
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(store_dir, 0o700)
    except OSError as err:
        raise StoreError(f"cannot write the store at {store_dir}: {err}. Choose a writable store_dir.") from err


@contextmanager
def hold_store(store_dir: str | os.PathLike, is_main_process: bool, barrier: Callable[[], None]) -> Iterator[None]:
    """The store's lock for a recording run: taken by the main process for all processes (the
    others wait at `barrier` until it is held), released when the block ends, on an error too. A
    forget request or another run on the store waits meanwhile, and this one waits for them."""
    store_dir = Path(store_dir)
    if is_main_process:
        make_store_folder(store_dir)
    with store_lock(store_dir, purpose=TRAINING) if is_main_process else nullcontext():
        barrier()
        yield


def open_manifest(
    model: nn.Module, args: AmnesiaConfig, resuming: bool, rank: int, num_processes: int, barrier: Callable[[], None]
) -> Manifest:
    """The store's manifest for a run that records `model` (made from `args` when there is no store
    yet), saved by the main process. Refuses a store of another model, of other settings, of a run
    that ended with other weights, or one whose last run did not finish (unless `resuming`)."""
    store_dir = Path(args.store_dir)
    layout = ParamLayout.from_model(model)
    if layout.num_params == 0:
        raise_problems([nothing_to_record()])
    existing = Manifest.load(store_dir)
    if existing is not None:
        if existing.layout.fingerprint() != layout.fingerprint():
            raise StoreError(
                f"the store at {store_dir} was recorded for another model or set of trainable parameters "
                f"({existing.num_params} entries, layout {existing.layout.fingerprint()[:12]}) than this one "
                f"({layout.num_params} entries, layout {layout.fingerprint()[:12]}). Use that model, or a new store_dir."
            )
        for name, mine, theirs in (
            ("keep_fraction", args.keep_fraction, existing.keep_fraction),
            ("store_dtype", args.store_dtype, existing.dtype),
            ("keep_seed", args.keep_seed, existing.seed),
            ("keep_layout", args.keep_layout, existing.keep_layout),
        ):
            if mine is not None and mine != theirs:
                raise ConfigError(
                    f"{name}={mine!r} conflicts with the existing store at {store_dir}, which fixes "
                    f"{name}={theirs!r}. Leave {name} unset to use the store's value, or use a new store_dir."
                )
        if (
            existing.final_weights is not None
            and not resuming
            and existing.final_weights != weights_fingerprint(layout.params_of(model))
        ):
            raise StoreError(
                f"the store at {store_dir} holds the records of a training run that ended with other weights "
                "than this model's: recording another run into it would mix the two runs' deltas. Use a new "
                "store_dir (or output_dir) for a new run, or delete that store; to train the recorded model "
                "further, load the weights it ended with."
            )
        manifest = existing
    else:
        manifest = Manifest(
            layout=layout,
            keep_fraction=float(args.keep_fraction or DEFAULT_KEEP_FRACTION),
            dtype=args.store_dtype or DEFAULT_STORE_DTYPE,
            seed=int(args.keep_seed if args.keep_seed is not None else DEFAULT_KEEP_SEED),
            keep_layout=args.keep_layout or DEFAULT_KEEP_LAYOUT,
        )
    manifest.num_shards = max(manifest.num_shards, num_processes)
    if rank == 0:
        try:
            store_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(store_dir, 0o700)
            if existing is None:
                manifest.create(store_dir)  # a new store: its key and store_id, then its manifest
            else:
                manifest.save(store_dir)
        except OSError as err:
            raise StoreError(f"cannot write the store at {store_dir}: {err}. Choose a writable store_dir.") from err
    barrier()
    if recording_marker(store_dir, rank).exists() and not resuming:
        raise StoreError(
            f"the store at {store_dir} holds records of a training run that did not finish. Resume that run with "
            "trainer.train(resume_from_checkpoint=...), or start over with a new store_dir."
        )
    return manifest


def recording_plan(manifest: Manifest, recorder, args: AmnesiaConfig, num_rows: int | None) -> str:
    """One line on what recording will take: entries per sample, the store's size, the open tails' memory."""
    ledger = recorder.ledger
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    tails = open_tail_bound(ledger.window, per_step, manifest.k, manifest.num_params)
    store = ""
    if num_rows is not None:
        size = num_rows * manifest.k * (4 if manifest.dtype == "float32" else 2)
        store = f"; the store of {num_rows} samples will take about {size / 2**20:.1f} MiB"
    sums = recorder.sums
    return (
        f"hf_amnesia: recording {manifest.k} of {manifest.num_params} trainable entries per sample "
        f"(keep_fraction={manifest.keep_fraction}, {manifest.dtype}){store} in {args.store_dir}; "
        f"the open momentum tails ({ledger.window} steps of {per_step} samples) take up to "
        f"{tails / 2**20:.1f} MiB on {ledger.ledger.device} (docs/limits.md, Memory)"
        + (f"; the in-memory sums take {sums.values.numel() * 4 / 2**20:.1f} MiB there." if sums is not None else ".")
    )

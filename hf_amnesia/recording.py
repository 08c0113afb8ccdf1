"""Opening the store for a recording run: the store's lock, held for the whole run (`hold_store`);
its manifest, made from the config or checked against it (`open_manifest`); the checks that refuse
a resume that would undo a forget or mix runs (`check_resume`); what the run will cost.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from safetensors import safe_open
from torch import nn

from .attribution import open_tail_bound
from .config import DEFAULT_KEEP_FRACTION, DEFAULT_KEEP_LAYOUT, DEFAULT_KEEP_SEED, DEFAULT_STORE_DTYPE, AmnesiaConfig
from .errors import ConfigError, StoreError
from .layout import ParamLayout
from .store import Manifest, ShardState, StoreReader, recording_marker
from .store.files import generation_paths, log_path
from .store.journal import recover, store_lock, weights_fingerprint
from .validate import nothing_to_record, raise_problems
from .version import __version__

RECORDER_STATE = "amnesia_recorder-{rank:05d}.safetensors"  # in each checkpoint, per process
TRAINING = "training run"  # what a recording run holds the store's lock for


def make_store_folder(store_dir: Path) -> None:
    """Create the store's folder (mode 0700) if it is not there."""
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(store_dir, 0o700)
    except OSError as err:
        raise StoreError(f"cannot write the store at {store_dir}: {err}. Choose a writable store_dir.") from err


def default_store_dtype(model: nn.Module) -> str:
    """The store's value type when `store_dtype` is unset: float32 for a PEFT model (its adapters are
    small, and float16 values cost the exact subtraction 3 orders of magnitude of completeness,
    docs/guide.md), DEFAULT_STORE_DTYPE otherwise."""
    return "float32" if hasattr(model, "peft_config") else DEFAULT_STORE_DTYPE


@contextmanager
def hold_store(store_dir: str | os.PathLike, is_main_process: bool, barrier: Callable[[], None]) -> Iterator[None]:
    """The store's lock for a recording run: taken by the main process for all processes (the
    others wait at `barrier` until it is held), released when the block ends, on an error too. A
    forget request or another run on the store waits meanwhile, and this one waits for them."""
    store_dir = Path(store_dir)
    if is_main_process:
        make_store_folder(store_dir)
    with store_lock(store_dir, purpose=TRAINING) if is_main_process else nullcontext():
        if is_main_process:
            recover(store_dir)  # a committed forget a crash interrupted is finished before the run reads the store
        barrier()
        yield


def open_manifest(
    model: nn.Module, args: AmnesiaConfig, resuming: bool, rank: int, num_processes: int, barrier: Callable[[], None]
) -> Manifest:
    """The store's manifest for a run that records `model` (made from `args` when there is no store
    yet), saved by the main process. Refuses a store of another model, of other settings, of a run
    that ended with other weights, or one whose last run did not finish (unless `resuming`). A run that
    does not resume gets a new `run_id`, saved with the manifest: only its own checkpoints resume it."""
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
        if not resuming and existing.final_weights is not None:  # (a manifest a peer process just made has none)
            StoreReader(store_dir)  # every shard's rows, ids and sums whole, before any training compute
        manifest = existing
    else:
        manifest = Manifest(
            layout=layout,
            keep_fraction=float(args.keep_fraction or DEFAULT_KEEP_FRACTION),
            dtype=args.store_dtype or default_store_dtype(model),
            seed=int(args.keep_seed if args.keep_seed is not None else DEFAULT_KEEP_SEED),
            keep_layout=args.keep_layout or DEFAULT_KEEP_LAYOUT,
        )
    shards = max(manifest.num_shards, num_processes)
    if not resuming and any(recording_marker(store_dir, r).exists() for r in range(shards)):
        raise StoreError(
            f"the store at {store_dir} holds records of a training run that did not finish. Resume that run with "
            "trainer.train(resume_from_checkpoint=...), or start over with a new store_dir."
        )
    manifest.num_shards = shards
    if not resuming:
        manifest.run_id = uuid.uuid4().hex  # its checkpoints can be resumed, no other run's
    if rank == 0:
        make_store_folder(store_dir)
        try:
            if existing is None:
                manifest.create(store_dir)  # a new store: its key and store_id, then its manifest
            else:
                manifest.save(store_dir)
        except OSError as err:
            raise StoreError(f"cannot write the store at {store_dir}: {err}. Choose a writable store_dir.") from err
    barrier()
    if rank != 0:  # the main process's store_id and run_id
        manifest = Manifest.load(store_dir)
    return manifest


def check_resume(store_dir: str | os.PathLike, checkpoint: str | os.PathLike, num_processes: int) -> None:
    """Refuse with `StoreError`, before anything is trained or written, to resume recording from
    `checkpoint` into the store at `store_dir` if the checkpoint belongs to another store or another
    run, if a forget was committed after it (resuming would bring back the rows it erased), or if
    the store no longer holds the generation and log the checkpoint goes back to. Every process
    checks every process's recorder state, so all of them refuse together."""
    store_dir, checkpoint = Path(store_dir), Path(checkpoint)
    manifest = Manifest.load(store_dir)
    if manifest is None:
        raise StoreError(
            f"there is no store at {store_dir} to resume recording into: the run of {checkpoint} recorded into a "
            "store that is gone or elsewhere. Set store_dir to that store, or train from the start."
        )
    for rank in range(num_processes):
        saved = _saved_identity(checkpoint, rank)
        if saved["store_id"] != manifest.store_id:
            raise StoreError(
                f"{checkpoint} was taken while recording into another store (store_id {saved['store_id']}) than the "
                f"one at {store_dir} ({manifest.store_id}): resuming would mix the two stores' records. Set "
                "store_dir to the store that run recorded into, or train from the start."
            )
        if saved["run_id"] != manifest.run_id:
            raise StoreError(
                f"{checkpoint} belongs to another training run (run_id {saved['run_id']}) than the one the store at "
                f"{store_dir} last started ({manifest.run_id}): resuming would mix the two runs' deltas. Resume "
                "from a checkpoint of the store's last run, or train from the start with a new store_dir."
            )
        if saved["commits"] < manifest.commits:
            raise StoreError(
                f"{manifest.commits - saved['commits']} forget request(s) were committed on the store at {store_dir} "
                f"after {checkpoint} was taken: resuming from it would bring back the rows they erased (its weights "
                "and open momentum tails still hold those samples) while the audit log says they are forgotten. "
                "Train further from the model the last forget saved (a new train() without resume_from_checkpoint, "
                "without the forgotten rows), or train from the start without them."
            )
        if saved["commits"] > manifest.commits:
            raise StoreError(
                f"{checkpoint} was taken after {saved['commits']} committed forget requests, but the store at "
                f"{store_dir} records {manifest.commits}: it was replaced by an older copy, which may hold rows "
                "since forgotten. Restore the store that run recorded into, or train from the start."
            )
        _check_shard_files(store_dir, checkpoint, rank, saved)
    if not any(recording_marker(store_dir, r).exists() for r in range(max(manifest.num_shards, num_processes))):
        raise StoreError(
            f"the store at {store_dir} holds no unfinished run: the run {checkpoint} belongs to has finished, and "
            "resuming it would record its last steps a second time. To train further, start a new train() (without "
            "resume_from_checkpoint) from the model it ended with."
        )


def _saved_identity(checkpoint: Path, rank: int) -> dict:
    """What one process's recorder state in `checkpoint` says about its store and shard."""
    path = checkpoint / RECORDER_STATE.format(rank=rank)
    if not path.exists():
        raise StoreError(
            f"{checkpoint} holds no hf_amnesia recorder state ({path.name}); it was not written by an "
            "AmnesiacTrainer with the same number of processes. Resume from a checkpoint of the recording run."
        )
    keys = ("store_id", "run_id", "commits", "generation", "log_size")
    with safe_open(str(path), framework="pt") as state:
        if not set(keys) <= set(state.keys()):
            raise StoreError(
                f"{path} was written by an hf_amnesia older than {__version__}, which did not record the store and "
                "the run it belongs to, so resuming from it cannot be checked. Finish that run with the version "
                "that started it, or train from the start."
            )
        saved = {key: state.get_tensor(key) for key in keys}
    # the ids are stored as uint8 tensors of their text (`Recorder.state_dict`)
    identity = {key: bytes(saved[key].tolist()).decode() or None for key in ("store_id", "run_id")}
    return identity | {key: int(saved[key]) for key in ("commits", "generation", "log_size")}


def _check_shard_files(store_dir: Path, checkpoint: Path, rank: int, saved: dict) -> None:
    """The generation of rows and the log length the checkpoint's shard state goes back to."""
    generation, current = saved["generation"], ShardState.load(store_dir, rank)
    if generation > 0:  # generation 0 is a shard's empty start, which has no files
        for path in generation_paths(store_dir, rank, generation):
            if path.exists():
                continue
            if current is not None and current.generation > generation:
                raise StoreError(
                    f"the run of {checkpoint} has finished: shard {rank} of the store at {store_dir} folded its "
                    f"records into generation {current.generation} and dropped generation {generation}, which this "
                    "checkpoint goes back to. Nothing is left to resume: train further with a new train() on the "
                    "model that run ended with."
                )
            raise StoreError(
                f"the store at {store_dir} is missing {path.name} (generation {generation} of shard {rank}), which "
                f"{checkpoint} resumes from: the run would train to the end and then fail to fold its records in. "
                "Restore the file from a backup, or train from the start with a new store_dir."
            )
    log = log_path(store_dir, rank)
    size = log.stat().st_size if log.exists() else 0
    if size < saved["log_size"]:
        raise StoreError(
            f"the store's log {log} holds {size} bytes, fewer than the {saved['log_size']} that {checkpoint} goes "
            "back to: the run has finished (its log was folded in) or the log was cut. Resume from a checkpoint of "
            "the store's last run, or train from the start."
        )


AUTO_SUMS_BYTES = 2**30  # sum_deltas_in_memory=None sums in memory when the sums take at most this


def sums_in_memory(setting: bool | None, train_dataset, k: int) -> bool:
    """Whether closed deltas are summed in memory (`sum_deltas_in_memory`): as set, or, when unset,
    for a `datasets.Dataset` (its ids are one column read) whose rows' sums take at most
    AUTO_SUMS_BYTES (`N * K * 4`)."""
    if setting is not None:
        return bool(setting)
    from .data import datasets

    hf_dataset = datasets is not None and isinstance(train_dataset, datasets.Dataset)
    return hf_dataset and len(train_dataset) * k * 4 <= AUTO_SUMS_BYTES


def recording_plan(manifest: Manifest, recorder, args: AmnesiaConfig, num_rows: int | None) -> str:
    """One line on what recording will take: entries per sample, the store's size, the open tails' memory."""
    ledger = recorder.ledger
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    open_steps = ledger.max_open or ledger.window
    tails = open_tail_bound(open_steps, per_step, manifest.k, manifest.num_params)
    bounded = (
        f", bounded by tail_memory_budget_mb={args.tail_memory_budget_mb:g}: closed after {open_steps} of their "
        f"{ledger.window} steps, the rest estimated"
        + (", and one step's tails alone exceed that budget" if tails > args.tail_memory_budget_mb * 2**20 else "")
        if ledger.max_open
        else ""
    )
    store = ""
    if num_rows is not None:
        size = num_rows * manifest.k * (4 if manifest.dtype == "float32" else 2)
        store = f"; the store of {num_rows} samples will take about {size / 2**20:.1f} MiB"
    sums = recorder.sums
    return (
        f"hf_amnesia: recording {manifest.k} of {manifest.num_params} trainable entries per sample "
        f"(keep_fraction={manifest.keep_fraction}, {manifest.dtype}){store} in {args.store_dir}; "
        f"the open momentum tails ({open_steps} steps of {per_step} samples{bounded}) take up to "
        f"{tails / 2**20:.1f} MiB on {ledger.ledger.device} (docs/limits.md, Memory)"
        + (f"; the in-memory sums take {sums.values.numel() * 4 / 2**20:.1f} MiB there." if sums is not None else ".")
    )

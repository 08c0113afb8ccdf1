"""Which ids a model has forgotten, and whether its store serves it at all.

The store is the authority (`store/lineage.py`): it serves only the weights its own run ended with
and weights a forget made from them, each registered with the keyed digests of the ids it has
forgotten. A model is looked up by the fingerprint of its trainable weights (`standing`), so the
answer travels with the weights themselves: a model saved and loaded again (a PEFT adapter
folder included) is recognised, and a model of another run, the untrained initial model, or one
trained or edited outside the store is refused before anything changes.

The model itself carries a record without ids (`hf_amnesia_forgotten` in its config, and
`hf_amnesia.json` next to whatever is saved): its store's id, the count of ids it has forgotten
and its fingerprint. That is all the model alone tells. Models saved by hf_amnesia 0.2 carry the
plain list `hf_amnesia_forgotten_ids`; it is read when the store knows the model's weights as its
run's final weights, and replaced by the record on the next save.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ..errors import ForgetRequestError, ModelLineageError, StoreError, UnsupportedTrainingError
from ..store.files import MANIFEST_NAME
from ..store.journal import weights_fingerprint
from ..store.keys import id_digests, load_key
from ..store.lineage import entries, lookup, register
from ..store.manifest import Manifest
from ..store.shards import ShardState

RECORD_ATTR = "hf_amnesia_forgotten"  # the model config's field: {"store", "count", "weights"}
LEGACY_ATTR = "hf_amnesia_forgotten_ids"  # hf_amnesia 0.2: the plain list of forgotten ids
RECORD_FILE = "hf_amnesia.json"  # the same record, beside every saved model (adapter folders too)
RUN_BEGUN = "run-begun:"  # lineage entry: what a recording run's start had forgotten (for its resume)
RUN_ENDED = "run-ended:"  # lineage entry: a run's deltas are in the store; earlier weights are not served


@dataclass(frozen=True)
class Standing:
    """A model's standing with its store: its weights' fingerprint and the digests of the ids those
    weights have forgotten."""

    weights: str
    digests: frozenset[str]
    key: bytes
    store_id: str | None

    def forgotten(self, ids) -> np.ndarray:
        """Mask of `ids` these weights have forgotten."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not self.digests or ids.size == 0:
            return np.zeros(ids.size, dtype=bool)
        return np.array([d in self.digests for d in id_digests(self.key, ids.tolist())], dtype=bool)

    def with_ids(self, weights: str, ids) -> Standing:
        """The standing of new weights that have also forgotten `ids`."""
        return Standing(weights, self.digests | set(id_digests(self.key, ids)), self.key, self.store_id)


def _holder(model: nn.Module):
    return getattr(model, "config", model)


def model_record(model: nn.Module) -> dict | None:
    """The record the model carries (`{"store", "count", "weights"}`), or None."""
    record = getattr(_holder(model), RECORD_ATTR, None)
    return dict(record) if isinstance(record, dict) else None


def set_record(model: nn.Module, standing: Standing) -> None:
    """Give the model the record of `standing` (replacing a 0.2 plain list)."""
    holder = _holder(model)
    record = {"store": standing.store_id, "count": len(standing.digests), "weights": standing.weights}
    setattr(holder, RECORD_ATTR, record)
    if hasattr(holder, LEGACY_ATTR):
        delattr(holder, LEGACY_ATTR)


def restore_record(model: nn.Module, record: dict | None, legacy) -> None:
    """Put back what `model_record` and the 0.2 list were (after a request that did not commit)."""
    holder = _holder(model)
    for attr, value in ((RECORD_ATTR, record), (LEGACY_ATTR, legacy)):
        if value is None:
            if hasattr(holder, attr):
                delattr(holder, attr)
        else:
            setattr(holder, attr, value)


def legacy_ids(model: nn.Module) -> list[int] | None:
    ids = getattr(_holder(model), LEGACY_ATTR, None)
    return None if ids is None else [int(i) for i in ids]


def standing(model: nn.Module, params, store_dir: str | os.PathLike, manifest: Manifest) -> Standing:
    """The standing of `model` (whose trainable weights are `params`) with the store, or
    `ModelLineageError` if the store does not serve these weights."""
    weights = weights_fingerprint(params)
    key = load_key(store_dir)
    record = model_record(model)
    if record is not None and record.get("store") not in (None, manifest.store_id):
        raise ModelLineageError(
            f"this model was forgotten from by another store (store id {record.get('store')}), not the store at "
            f"{store_dir} (store id {manifest.store_id}). Nothing was changed; use the store of the run that "
            "trained this model."
        )
    digests, legacy = served(store_dir, weights), legacy_ids(model)
    if digests is not None and legacy:  # a 0.2 list may name ids a later compaction dropped: never again
        digests = digests | set(id_digests(key, legacy))
    if digests is None:
        if legacy is None or weights != manifest.final_weights:
            raise ModelLineageError(
                f"the store at {store_dir} does not serve this model: its weights (fingerprint {weights[:12]}) are "
                f"neither those its training run ended with (fingerprint {str(manifest.final_weights)[:12]}) nor "
                "weights a forget made from them. A model of another training run, the untrained initial model, "
                "or one trained, edited or saved in another dtype outside the store cannot be served. Nothing "
                "was changed. Load the model this store recorded (or the one a forget saved from it)."
            )
        digests = frozenset(id_digests(key, legacy))
    return Standing(weights, digests, key, manifest.store_id)


def served(store_dir, weights: str) -> frozenset[str] | None:
    """What the weights `weights` have forgotten, if the store serves them: registered since the
    latest recording run ended (`run-ended:` entries). A run adds its samples' deltas to the store,
    so weights from before it no longer match what the store would subtract."""
    found = None
    for entry in entries(store_dir):
        if entry["weights"].startswith(RUN_ENDED):
            found = None
        elif entry["weights"] == weights:
            found = frozenset(entry["forgotten"])
    return found


def saved_record(folder: Path) -> dict | None:
    """The record of a model saved at `folder` (`hf_amnesia.json`, or its config), or None."""
    for name in (RECORD_FILE, "config.json"):
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise StoreError(f"cannot read {path} ({err}); fix or remove that file.") from None
            if name == RECORD_FILE:
                return data
            if isinstance(data.get(RECORD_ATTR), dict):
                return data[RECORD_ATTR]
            if data.get(LEGACY_ATTR) is not None:
                return {LEGACY_ATTR: data[LEGACY_ATTR]}
    return None


def write_record_file(model: nn.Module, folder: str | os.PathLike) -> None:
    """Write `hf_amnesia.json` beside a saved model, if the model has a record."""
    record = model_record(model)
    if record is not None:
        (Path(folder) / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")


def refuse_stale_model(save_to: Path, mine: Standing, store_dir) -> None:
    """A model saved at `save_to` that forgot ids the one in memory has not must not be overwritten."""
    saved = saved_record(save_to)
    if saved is None:
        return
    if LEGACY_ATTR in saved:
        theirs = set(id_digests(mine.key, saved[LEGACY_ATTR]))
    else:
        theirs = served(store_dir, str(saved.get("weights"))) if saved.get("store") == mine.store_id else None
    if theirs and not theirs <= mine.digests:
        raise ForgetRequestError(
            f"the model saved at {save_to} has already forgotten {len(theirs - mine.digests)} id(s) this model in "
            f"memory has not: it is newer. Nothing was changed. Load the model from {save_to} and retry."
        )


def forgotten_ids(mine: Standing, reader, dataset_ids=None) -> list[int]:
    """Every id of the store (held or purged) or of `dataset_ids` that the weights of `mine` have
    forgotten: a forget can only have forgotten ids the store held, and the ids of rows a later
    run's compaction dropped are still purged or are in the training data."""
    candidates = np.union1d(reader.all_ids(), purged_ids(reader.states))
    if dataset_ids is not None:
        candidates = np.union1d(candidates, np.asarray(dataset_ids, dtype=np.int64))
    return candidates[mine.forgotten(candidates)].tolist()


def purged_ids(states) -> np.ndarray:
    """Ids whose rows the store purged, in any of the shards' `states`."""
    return np.array(sorted(set().union(*(set(s.purged) for s in states if s is not None))), dtype=np.int64)


def stored_forgotten_ids(model: nn.Module, store_dir: str | os.PathLike, dataset_ids=None) -> list[int]:
    """The ids `model` has forgotten, by its store's lineage, among the store's ids and
    `dataset_ids` ([] if there is no store yet; `ModelLineageError` if the store does not serve it)."""
    from ..layout import ParamLayout
    from ..store import StoreReader

    if not (Path(store_dir) / MANIFEST_NAME).exists():
        return []
    reader = StoreReader(store_dir)
    params = ParamLayout.from_model(model).params_of(model)
    return forgotten_ids(standing(model, params, store_dir, reader.manifest), reader, dataset_ids)


def run_start_standing(model: nn.Module, manifest: Manifest, store_dir, resuming: bool) -> Standing:
    """What the weights a recording run starts from have forgotten: a new run starts from the
    store's final weights (or a new store); a resumed run finds its start's in the lineage (its
    weights are then a checkpoint's)."""
    weights = weights_fingerprint(manifest.layout.params_of(model))
    if resuming:
        digests = lookup(store_dir, f"{RUN_BEGUN}{manifest.run_id}")
    else:
        digests = served(store_dir, weights) if manifest.final_weights == weights else None
    return Standing(weights, digests or frozenset(), load_key(store_dir), manifest.store_id)


def run_start(model: nn.Module, store_dir, resuming: bool) -> tuple[Standing | None, np.ndarray]:
    """Before a recording run touches the store: what its start has forgotten (None for a new
    store) and the ids the store has purged."""
    manifest = Manifest.load(Path(store_dir))
    if manifest is None:
        return None, np.zeros(0, dtype=np.int64)
    purged = purged_ids(ShardState.load(Path(store_dir), rank) for rank in range(manifest.num_shards))
    start = run_start_standing(model, manifest, store_dir, resuming)
    return start, purged


def register_run_start(store_dir, manifest: Manifest, start: Standing) -> None:
    """Note what a recording run's start had forgotten (the main process, as the run starts to
    write), for its resume: the weights it starts from stay served until it ends."""
    if manifest.run_id is not None:
        register(store_dir, f"{RUN_BEGUN}{manifest.run_id}", start.digests)


def refuse_forgotten_rows(start: Standing, train_ids, purged) -> None:
    """Training on rows the model has forgotten would undo the forget, and on rows the store purged
    for another model would add deltas to ids whose earlier influence the store can no longer
    remove: both refused before the run starts."""
    if train_ids is None:
        return
    train_ids = np.asarray(train_ids)
    again = train_ids[start.forgotten(train_ids) | np.isin(train_ids, purged)].tolist()
    if again:
        raise UnsupportedTrainingError(
            f"{len(again)} training rows have ids this model has forgotten, or the store has purged (e.g. "
            f"{again[:5]}); training on them again would undo the forget. Remove those rows from train_dataset."
        )


def register_run_end(model: nn.Module, store_dir, manifest: Manifest, end: Standing) -> None:
    """The weights a recording run ended with are served, having forgotten what its start had, and
    no weights from before it (the main process, at the end of training)."""
    register(store_dir, f"{RUN_ENDED}{manifest.run_id}", ())
    register(store_dir, end.weights, end.digests)
    set_record(model, end)

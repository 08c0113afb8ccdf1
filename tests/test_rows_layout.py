"""The `rows` layout end to end: what it stores equals the full per-sample deltas at its positions."""

import numpy as np
import pytest
import torch
from tiny import TinyCNN, image_dataset, tiny_config

from hf_amnesia import AmnesiacTrainer, ConfigError, StoreReader, recorder
from hf_amnesia.forgetting import forget_update
from hf_amnesia.store import manifest_positions, row_plan

REL_TOL = 1e-5


def _train(out, **overrides):
    torch.manual_seed(0)
    model = TinyCNN()
    args = tiny_config(out, store_dtype="float32", num_train_epochs=2, learning_rate=1e-2, **overrides)
    trainer = AmnesiacTrainer(model=model, args=args, train_dataset=image_dataset(24, with_ids=True))
    trainer.train()
    return trainer, StoreReader(args.store_dir)


@pytest.mark.parametrize("on_device", [False, True], ids=["hashed_on_host", "hashed_on_device"])
def test_rows_store_equals_full_deltas_at_its_positions(tmp_path, monkeypatch, on_device):
    # On a GPU the recorder hashes the positions there; forget always hashes them on the host.
    monkeypatch.setattr(recorder, "_hashes_on_device", lambda device: on_device)
    _, full = _train(tmp_path / "full", keep_fraction=1.0)
    trainer, rows = _train(tmp_path / "rows", keep_fraction=0.3, keep_layout="rows")
    manifest = rows.manifest
    assert manifest.keep_layout == "rows"
    assert manifest.k == sum(r * c for _, c, r in row_plan(0.3, manifest.layout.shapes)) < manifest.num_params
    ids = rows.all_ids()
    positions = manifest_positions(manifest, ids)
    for dataset_id, where in zip(ids.tolist(), positions):
        expected = full.read(dataset_id)[torch.from_numpy(where)]
        got = rows.read(dataset_id)
        assert (got - expected).norm() <= REL_TOL * expected.norm()
    # forget subtracts exactly those entries of the full deltas (times the decay factor Q)
    subset = ids[:5]
    expected = torch.zeros(manifest.num_params, dtype=torch.float64)
    for dataset_id, where in zip(subset.tolist(), manifest_positions(manifest, subset)):
        index = torch.from_numpy(where)
        expected.index_add_(0, index, full.read(dataset_id)[index].double())
    decay = torch.tensor(manifest.decay, dtype=torch.float64).repeat_interleave(torch.tensor(manifest.layout.numels))
    got = forget_update(rows, subset)
    assert (got - expected * decay).norm() <= REL_TOL * got.norm()


def test_keep_layout_is_fixed_by_the_store(tmp_path):
    _train(tmp_path, keep_fraction=0.3, keep_layout="rows", max_steps=1)
    with pytest.raises(ConfigError, match="keep_layout"):
        _train(tmp_path, keep_layout="entries", max_steps=1)
    with pytest.raises(ConfigError, match="keep_layout must be one of"):
        tiny_config(tmp_path, keep_layout="blocks")
    assert np.isfinite(StoreReader(tmp_path / "_amnesia_store").manifest.k)


def test_a_new_run_into_a_finished_store_is_refused(tmp_path):
    from hf_amnesia import StoreError

    trainer, reader = _train(tmp_path, keep_fraction=0.3, max_steps=2)
    before = {int(i): reader.read(int(i)).clone() for i in reader.all_ids()}
    torch.manual_seed(1)  # another model (other initial weights) into the same store
    other = AmnesiacTrainer(
        model=TinyCNN(),
        args=tiny_config(tmp_path, store_dtype="float32", max_steps=2),
        train_dataset=image_dataset(24, with_ids=True),
    )
    with pytest.raises(StoreError, match="new store_dir"):
        other.train()
    after = StoreReader(trainer.args.store_dir)
    assert all(torch.equal(after.read(i), row) for i, row in before.items())  # nothing was mixed in

"""Kind 11: a store over its life: forgets, further training runs, siblings and failed runs.

What a review of the fixes for kinds 1-10 broke, each a case: a refused run must change nothing;
a run that fails before its first step must leave the model it started from served; training
further must not lose which ids earlier forgets removed (nor which the store purged for another
model); a request from a sibling model must not move the weights the store may train further; a
run must finish an interrupted forget before it reads the store; the CLI must not lock or audit a
folder that is not a store.
"""

from __future__ import annotations

import pytest
import torch
from adversary import cli, copy_case, forget_argv, hashes, load, params, trainer_for
from tiny import text_dataset, tiny_config

from hf_amnesia import AmnesiacTrainer, StoreError, StoreReader, UnsupportedTrainingError
from hf_amnesia.errors import ForgetIncompleteError
from hf_amnesia.store import Manifest


def _rows(excluded):
    data = text_dataset(16)
    keep = [i for i in range(16) if i not in excluded]
    return data.select(keep).add_column("dataset_id", keep)


def _train_further(case, model, excluded, tag="further", **overrides):
    args = tiny_config(case.out / tag, store_dir=str(case.store), num_train_epochs=1, learning_rate=5e-3, **overrides)
    AmnesiacTrainer(model=model, args=args, train_dataset=_rows(excluded)).train()
    return model


def test_k11_a_refused_run_on_forgotten_rows_changes_nothing(tmp_path, capsys):
    case = copy_case(tmp_path)
    assert cli(capsys, *forget_argv(case, 2, 5)).code == 0
    before = hashes(case.root)
    args = tiny_config(case.out / "again", store_dir=str(case.store), num_train_epochs=1)
    with pytest.raises(UnsupportedTrainingError, match="forgotten"):
        AmnesiacTrainer(model=load(case.model), args=args, train_dataset=text_dataset(16)).train()
    assert hashes(case.root) == before


def test_k11_a_run_that_fails_at_its_first_step_leaves_its_start_served(tmp_path):
    case = copy_case(tmp_path)
    model = load(case.model)
    args = tiny_config(case.out / "broken", store_dir=str(case.store), num_train_epochs=1)
    trainer = AmnesiacTrainer(
        model=model,
        args=args,
        train_dataset=text_dataset(16),
        data_collator=lambda rows: {"input_ids": torch.stack([torch.as_tensor(r["input_ids"]) for r in rows])},
    )
    with pytest.raises(UnsupportedTrainingError, match="no 'dataset_id' column"):
        trainer.train()
    report = trainer_for(load(case.model), case.store, case.out).forget([3], scale=1.0, repair_steps=0)
    assert report.forgotten == [3]


def test_k11_forgotten_ids_survive_a_further_run(tmp_path, capsys):
    case = copy_case(tmp_path)
    assert cli(capsys, *forget_argv(case, 2, 5)).code == 0
    model = _train_further(case, load(case.model), {2, 5})
    args = tiny_config(case.out / "later", store_dir=str(case.store))
    later = AmnesiacTrainer(
        model=model, args=args, train_dataset=text_dataset(16).add_column("dataset_id", list(range(16)))
    )
    assert later.forgotten_ids() == [2, 5]
    report = later.forget([2, 7], scale=1.0, repair_steps=1)  # the repair must not train on 2 and 5 again
    assert report.already_forgotten == [2] and report.forgotten == [7]
    assert later.forgotten_ids() == [2, 5, 7]


def test_k11_a_sibling_request_does_not_move_the_trainable_model(tmp_path, capsys):
    case = copy_case(tmp_path)
    first = case.root / "first"
    assert cli(capsys, *forget_argv(case, 2, extra=["--save-to", first])).code == 0
    trainable = Manifest.load(case.store).final_weights
    assert cli(capsys, *forget_argv(case, 999)).code == 0  # from the original model: changes nothing
    assert cli(capsys, *forget_argv(case, 3, extra=["--save-to", case.root / "second"])).code == 0
    assert Manifest.load(case.store).final_weights == trainable  # still `first/`'s weights
    with pytest.raises(StoreError, match="ended with other weights"):  # the original may not train further, ...
        _train_further(case, load(case.model), {2, 3}, tag="original")
    _train_further(case, load(first), {2, 3})  # ... the head may


def test_k11_purged_elsewhere_survives_a_further_run(tmp_path, capsys):
    case = copy_case(tmp_path)
    first = case.root / "first"
    assert cli(capsys, *forget_argv(case, 2, extra=["--save-to", first])).code == 0
    assert cli(capsys, *forget_argv(case, 3, extra=["--save-to", case.root / "second"])).code == 0  # a sibling
    with pytest.raises(UnsupportedTrainingError, match="purged"):  # 3 was erased for the sibling
        _train_further(case, load(first), {2})
    model = _train_further(case, load(first), {2, 3}, tag="without")
    assert 3 in StoreReader(case.store).states[0].purged  # the compaction kept the record of it
    model.save_pretrained(str(case.root / "head"))
    result = cli(capsys, *forget_argv(case, 3, model=case.root / "head"))
    assert result.code == 4 and result.json()["purged_elsewhere"] == [3]


def test_k11_training_finishes_an_interrupted_forget_first(tmp_path, monkeypatch):
    case = copy_case(tmp_path)
    monkeypatch.setenv("HF_AMNESIA_FAIL_AT", "forget:committed")
    model = load(case.model)
    with pytest.raises(ForgetIncompleteError):
        trainer_for(model, case.store, case.out).forget([2, 5], scale=1.0, repair_steps=0, save_to=case.model)
    monkeypatch.delenv("HF_AMNESIA_FAIL_AT")
    weights = params(model)
    with pytest.raises(UnsupportedTrainingError, match="forgotten|purged"):  # recovered first: 2 and 5 are gone
        _train_further(case, load(case.model), set())
    assert not StoreReader(case.store).locate(2)
    _train_further(case, model, {2, 5})
    assert max(float((weights[k] - v).abs().max()) for k, v in params(model).items()) > 0


@pytest.mark.parametrize("command", ["forget", "recover", "audit"])
def test_k11_cli_on_a_folder_that_is_not_a_store(tmp_path, capsys, command):
    case = copy_case(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    before = hashes(case.root, empty)
    argv = forget_argv(case, 2) if command == "forget" else [command, str(empty)]
    if command == "forget":
        argv[argv.index("--store") + 1] = str(empty)
    result = cli(capsys, *argv)
    assert result.code == 2 and "Traceback" not in result.err, result
    assert hashes(case.root, empty) == before and not (empty / ".lock").exists()

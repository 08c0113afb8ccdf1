"""Kind 1: a model of another run is refused before anything changes; the README flow keeps working.

A store serves the weights its run ended with and the weights its forgets made from them. Any
other model of the same architecture (another seed, the untrained initial weights, the right
model with one weight moved by 1e-3, the model of another store, a model saved before the run was
trained further) is refused: `ModelLineageError` from the API, exit 2 from the CLI, every file
as it was.
"""

from __future__ import annotations

import functools
import shutil

import pytest
import torch
from adversary import (
    IDS,
    _scratch,
    assert_model_equals_clean_forget,
    audit_records,
    cli,
    copy_case,
    forget_argv,
    hashes,
    load,
    other_run,
    params,
    train_run,
    trainer_for,
)
from tiny import text_dataset, tiny_bert, tiny_config

from hf_amnesia import AmnesiacTrainer
from hf_amnesia.errors import ModelLineageError


@functools.cache
def _initial_model():
    folder = _scratch("initial") / "model"
    tiny_bert(seed=0).save_pretrained(str(folder))  # the weights the pristine run started from
    return folder


@functools.cache
def _perturbed_model():
    from adversary import pristine

    model = load(pristine() / "model")
    with torch.no_grad():
        model.classifier.weight[0, 0] += 1e-3
    folder = _scratch("perturbed") / "model"
    model.save_pretrained(str(folder))
    return folder


@functools.cache
def _trained_further():
    """A run whose model was saved (`early/`), then trained further into the same store (`model/`)."""
    root = train_run(_scratch("further"))
    shutil.copytree(root / "model", root / "early")
    model = load(root / "model")
    args = tiny_config(root / "run", num_train_epochs=1, learning_rate=5e-3)
    AmnesiacTrainer(model=model, args=args, train_dataset=text_dataset(16)).train()
    model.save_pretrained(str(root / "model"))
    return root


def _other(kind):
    """(model folder of the other run, root of the run whose store is attacked)."""
    from adversary import pristine

    if kind == "other_seed":
        return other_run(1, 0) / "model", pristine()
    if kind == "initial":
        return _initial_model(), pristine()
    if kind == "perturbed":
        return _perturbed_model(), pristine()
    if kind == "other_store":
        return other_run(0, 1) / "model", pristine()
    root = _trained_further()
    return root / "early", root


KINDS = ["other_seed", "initial", "perturbed", "other_store", "saved_before_training_further"]


@pytest.mark.parametrize("kind", KINDS)
def test_k1_cli_refuses_model_of_another_run(tmp_path, capsys, kind):
    source, run = _other(kind)
    case = copy_case(tmp_path, run)
    other = shutil.copytree(source, tmp_path / "other")
    before = hashes(case.root, other)
    result = cli(capsys, *forget_argv(case, *IDS, model=other, extra=["--strict"]))
    assert result.code == 2, result
    assert "Traceback" not in result.err
    assert hashes(case.root, other) == before


@pytest.mark.parametrize("kind", KINDS)
def test_k1_api_refuses_model_of_another_run(tmp_path, kind):
    source, run = _other(kind)
    case = copy_case(tmp_path, run)
    other = shutil.copytree(source, tmp_path / "other")
    model = load(other)
    weights = params(model)
    before = hashes(case.root, other)
    with pytest.raises(ModelLineageError):
        trainer_for(model, case.store, case.out).forget(IDS, scale=1.0, repair_steps=0, save_to=other)
    assert hashes(case.root, other) == before
    assert all(torch.equal(weights[k], v) for k, v in params(model).items())


def test_k1_right_model_served_after_a_refused_one(tmp_path, capsys):
    """The review's case: the other seed's request exited 0 and the right model later got "unknown"."""
    source, run = _other("other_seed")
    case = copy_case(tmp_path, run)
    other = shutil.copytree(source, tmp_path / "other")
    assert cli(capsys, *forget_argv(case, *IDS, model=other, extra=["--strict"])).code == 2
    result = cli(capsys, *forget_argv(case, *IDS, extra=["--strict"]))
    assert result.code == 0, result
    assert result.json()["forgotten"] == 3 and result.json()["unknown"] == []
    assert_model_equals_clean_forget(case.model, IDS)
    assert len(audit_records(case.store)) == 1


def test_k1_readme_flow_in_memory_then_save_then_new_trainer(tmp_path):
    """forget in memory, trainer.save_model(dir), then a new trainer (a new process) forgets again."""
    case = copy_case(tmp_path)
    first = trainer_for(load(case.model), case.store, case.out / "a")
    assert first.forget([2, 5], scale=1.0, repair_steps=0).forgotten == [2, 5]
    saved = tmp_path / "saved"
    first.save_model(str(saved))
    later = trainer_for(load(saved), case.store, case.out / "b")
    report = later.forget([2, 11], scale=1.0, repair_steps=0, save_to=saved)
    assert report.already_forgotten == [2] and report.forgotten == [11] and report.committed
    assert_model_equals_clean_forget(saved, IDS)
    assert len(audit_records(case.store)) == 1


def test_k1_five_forgets_in_a_row_in_memory(tmp_path):
    case = copy_case(tmp_path)
    model = load(case.model)
    trainer = trainer_for(model, case.store, case.out)
    for n, i in enumerate([1, 4, 7, 9, 13], start=1):
        report = trainer.forget([i], scale=1.0, repair_steps=0, save_to=case.model)
        assert report.forgotten == [i] and report.committed
        assert len(audit_records(case.store)) == n
    assert_model_equals_clean_forget(model, [1, 4, 7, 9, 13])
    assert_model_equals_clean_forget(case.model, [1, 4, 7, 9, 13])


def test_k1_cli_forget_then_cli_forget_again(tmp_path, capsys):
    case = copy_case(tmp_path)
    first = cli(capsys, *forget_argv(case, 2, 5))
    assert first.code == 0 and first.json()["forgotten"] == 2, first
    again = cli(capsys, *forget_argv(case, 5, 11))
    assert again.code == 0 and again.json()["forgotten"] == 1 and again.json()["already_forgotten"] == 1, again
    assert_model_equals_clean_forget(case.model, IDS)
    assert len(audit_records(case.store)) == 2


def test_k1_model_saved_by_a_committed_forget_served(tmp_path, capsys):
    """A forget saved elsewhere (--save-to) gives a model the store serves next."""
    case = copy_case(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    assert cli(capsys, *forget_argv(case, 2, extra=["--save-to", elsewhere])).code == 0
    result = cli(capsys, *forget_argv(case, 5, 11, model=elsewhere))
    assert result.code == 0 and result.json()["forgotten"] == 2, result
    assert_model_equals_clean_forget(elsewhere, IDS)
    assert len(audit_records(case.store)) == 2

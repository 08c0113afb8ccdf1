"""Kind 10: PEFT (LoRA) adapters keep their forgotten-id record, and the CLI loads them.

`save_model` on a PEFT model writes the adapter files only; the record of what it forgot must
travel with them, so that after `PeftModel.from_pretrained(...)` (a new process) forgetting the
same ids reports them as `already_forgotten` and changes nothing. `hf-amnesia forget --model
ADAPTER_DIR` loads the base model named by the adapter's config (or `--base BASE_DIR`) plus the
adapter.
"""

from __future__ import annotations

import functools
import shutil

import pytest
import torch
from adversary import _scratch, audit_records, cli, trainer_for
from tiny import text_dataset, tiny_bert, tiny_config

from hf_amnesia import AmnesiacTrainer

peft = pytest.importorskip("peft")
TOL = 1e-6


@functools.cache
def _run():
    """`base/` (tiny BERT saved), a LoRA adapter trained with recording (`adapter/`), its store."""
    root = _scratch("peft")
    tiny_bert().save_pretrained(str(root / "base"))
    config = peft.LoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS", r=2)
    model = peft.get_peft_model(_base_from(root), config)
    args = tiny_config(root / "run", keep_fraction=0.1, store_dtype="float32", num_train_epochs=2, learning_rate=5e-3)
    trainer = AmnesiacTrainer(model=model, args=args, train_dataset=text_dataset(16))
    trainer.train()
    trainer.save_model(str(root / "adapter"))
    return root


def _base_from(root):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(str(root / "base"))


def _copy(tmp_path):
    root = shutil.copytree(_run(), tmp_path / "case")
    return root / "adapter", root / "run" / "_amnesia_store"


def _adapter(folder):
    return peft.PeftModel.from_pretrained(_base_from(_run()), str(folder), is_trainable=True)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@functools.cache
def _clean(ids):
    adapter, store = _copy(_scratch("peft_clean"))
    model = _adapter(adapter)
    trainer_for(model, store, adapter.parent / "out").forget(list(ids), scale=1.0, repair_steps=0)
    return _trainable(model)


def _assert_clean(folder, ids):
    got, want = _trainable(_adapter(folder)), _clean(tuple(ids))
    assert sorted(got) == sorted(want)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= TOL


def test_k10_adapter_record_survives_save_and_reload(tmp_path):
    """The review's case: the second forget in a new process subtracted ids 1-3 again."""
    adapter, store = _copy(tmp_path)
    first = trainer_for(_adapter(adapter), store, tmp_path / "a")
    assert first.forget([1, 2, 3], scale=1.0, repair_steps=0).forgotten == [1, 2, 3]
    saved = tmp_path / "saved"
    first.save_model(str(saved))
    model = _adapter(saved)
    weights = _trainable(model)
    report = trainer_for(model, store, tmp_path / "b").forget([1, 2, 3], scale=1.0, repair_steps=0)
    assert report.already_forgotten == [1, 2, 3] and report.forgotten == []
    assert all(torch.equal(weights[k], v) for k, v in _trainable(model).items())


@pytest.mark.parametrize("base", ["from_adapter_config", "base_flag"])
def test_k10_cli_adapter(tmp_path, capsys, base):
    adapter, store = _copy(tmp_path)
    extra = ["--base", adapter.parent / "base"] if base == "base_flag" else []
    result = cli(capsys, "forget", "--model", adapter, "--store", store, "--ids", 1, 2, 3, *extra)
    assert result.code == 0 and result.json()["forgotten"] == 3 and "Traceback" not in result.err, result
    _assert_clean(adapter, [1, 2, 3])
    assert len(audit_records(store)) == 1


def test_k10_cli_adapter_forget_twice(tmp_path, capsys):
    adapter, store = _copy(tmp_path)
    assert cli(capsys, "forget", "--model", adapter, "--store", store, "--ids", 1, 2).code == 0
    again = cli(capsys, "forget", "--model", adapter, "--store", store, "--ids", 2, 3)
    assert again.code == 0 and again.json()["already_forgotten"] == 1 and again.json()["forgotten"] == 1, again
    _assert_clean(adapter, [1, 2, 3])
    assert len(audit_records(store)) == 2

"""forget(): accepted id types, reports, strictness, idempotency, and forgetting in a new process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny import TinyCNN, image_dataset, text_dataset, tiny_bert, tiny_config
from transformers import BertForSequenceClassification

from hf_amnesia import AmnesiaConfig, AmnesiacTrainer, ForgetReport, ForgetRequestError, StoreError, ids_of_label


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


@pytest.fixture(scope="module")
def trained_cnn(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn")
    torch.manual_seed(0)
    model = TinyCNN()
    args = tiny_config(out, keep_fraction=0.5, num_train_epochs=2, learning_rate=1e-2)
    dataset = image_dataset(20, with_ids=True)
    trainer = AmnesiacTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return trainer, dataset, _flat(model)


def _fresh(trainer, theta):
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta.clone(), trainer.model.parameters())


@pytest.mark.parametrize(
    "make_ids",
    [
        lambda ids: list(ids),
        lambda ids: np.asarray(ids),
        lambda ids: torch.tensor(ids),
        lambda ids: np.asarray(ids, dtype=np.int32),
    ],
    ids=["list", "numpy", "torch", "int32"],
)
def test_id_types_give_the_same_change(trained_cnn, make_ids):
    trainer, dataset, theta = trained_cnn
    _fresh(trainer, theta)
    report = trainer.forget(make_ids([100, 107, 114]), scale=1.0, repair_steps=0)
    assert isinstance(report, ForgetReport)
    assert report.forgotten == [100, 107, 114] and report.unknown == [] and report.already_forgotten == []
    assert report.delta_norm > 0 and report.seconds >= 0
    change = _flat(trainer.model) - theta
    _fresh(trainer, theta)
    trainer.forget([100, 107, 114], scale=1.0, repair_steps=0)
    assert torch.equal(_flat(trainer.model) - theta, change)


def test_datasets_column_and_class_helper(trained_cnn):
    trainer, dataset, theta = trained_cnn
    _fresh(trainer, theta)
    class_ids = ids_of_label(dataset, 1, label_column="labels")
    expected = [int(i) for i, y in zip(dataset["dataset_id"], dataset["labels"]) if int(y) == 1]
    assert sorted(class_ids.tolist()) == expected and expected
    report = trainer.forget(dataset.filter(lambda r: int(r["labels"]) == 1)["dataset_id"], scale=1.0, repair_steps=0)
    assert report.forgotten == expected


def test_unknown_ids_are_reported_and_strict_changes_nothing(trained_cnn):
    trainer, dataset, theta = trained_cnn
    _fresh(trainer, theta)
    with pytest.raises(ForgetRequestError, match="not in the store"):
        trainer.forget([100, 5], strict=True, scale=1.0, repair_steps=0)
    assert torch.equal(_flat(trainer.model), theta)
    assert trainer.forgotten_ids() == []
    report = trainer.forget([100, 5], scale=1.0, repair_steps=0)
    assert report.forgotten == [100] and report.unknown == [5]


def test_forgetting_twice_subtracts_once(trained_cnn):
    trainer, dataset, theta = trained_cnn
    _fresh(trainer, theta)
    trainer.forget([121], scale=1.0, repair_steps=0)
    once = _flat(trainer.model)
    report = trainer.forget([121, 121], scale=1.0, repair_steps=0)
    assert report.already_forgotten == [121] and report.forgotten == []
    assert torch.equal(_flat(trainer.model), once)


@pytest.mark.parametrize("bad", [None, "12", [1.5], [[1, 2]], [-3], [True], 3.0, [None], object()], ids=str)
def test_malformed_ids_raise_and_change_nothing(trained_cnn, bad):
    trainer, dataset, theta = trained_cnn
    _fresh(trainer, theta)
    with pytest.raises(ForgetRequestError):
        trainer.forget(bad, scale=1.0, repair_steps=0)
    assert torch.equal(_flat(trainer.model), theta)


def test_empty_request_changes_nothing(trained_cnn, tmp_path):
    trainer, dataset, theta = trained_cnn
    _fresh(trainer, theta)
    report = trainer.forget([], scale=1.0, repair_steps=0)
    assert report.forgotten == [] and report.delta_norm == 0
    assert torch.equal(_flat(trainer.model), theta)
    # nothing saved, no audit record, with the defaults too (no data is even read)
    store = trainer.args.store_dir
    audit = os.path.join(store, "audit.jsonl")
    before = open(audit, "rb").read() if os.path.exists(audit) else None
    for kwargs in ({"scale": 1.0, "repair_steps": 0}, {}):
        report = trainer.forget([], save_to=tmp_path / "model", **kwargs)
        assert not report.committed and report.request is None and report.scale == 0.0
    assert not (tmp_path / "model").exists()
    assert (open(audit, "rb").read() if os.path.exists(audit) else None) == before
    assert torch.equal(_flat(trainer.model), theta)


def test_repair_needs_training_data(trained_cnn, tmp_path):
    trainer, dataset, theta = trained_cnn
    late = AmnesiacTrainer(
        model=trainer.model,
        args=AmnesiaConfig(output_dir=str(tmp_path), store_dir=trainer.args.store_dir, report_to=[], use_cpu=True),
    )
    _fresh(late, theta)
    with pytest.raises(ForgetRequestError, match="train_dataset"):
        late.forget([100], repair_steps=3, scale=1.0)
    assert torch.equal(_flat(trainer.model), theta)


def test_repair_trains_on_retained_rows_only(trained_cnn):
    trainer, dataset, theta = trained_cnn
    _fresh(trainer, theta)
    report = trainer.forget([100, 107], scale=0.5, repair_steps=2)
    assert report.repair_steps == 2 and report.scale == 0.5
    assert not torch.equal(_flat(trainer.model), theta)


def test_wrong_store_is_refused(trained_cnn, tmp_path):
    trainer, _, _ = trained_cnn
    other = AmnesiacTrainer(
        model=TinyCNN(channels=2),
        args=AmnesiaConfig(output_dir=str(tmp_path), store_dir=trainer.args.store_dir, report_to=[], use_cpu=True),
    )
    before = _flat(other.model)
    with pytest.raises(StoreError, match="another model"):
        other.forget([100], scale=1.0, repair_steps=0)
    assert torch.equal(_flat(other.model), before)
    missing = AmnesiacTrainer(
        model=TinyCNN(),
        args=AmnesiaConfig(output_dir=str(tmp_path), store_dir=str(tmp_path / "nowhere"), report_to=[], use_cpu=True),
    )
    with pytest.raises(StoreError, match="no hf_amnesia store"):
        missing.forget([100], scale=1.0, repair_steps=0)


NEW_PROCESS = """
import json, sys, torch
from transformers import BertForSequenceClassification
from hf_amnesia import AmnesiaConfig, AmnesiacTrainer
model = BertForSequenceClassification.from_pretrained(sys.argv[1])
trainer = AmnesiacTrainer(model=model, args=AmnesiaConfig(output_dir=sys.argv[2], store_dir=sys.argv[3], report_to=[], use_cpu=True))
report = trainer.forget([1, 4, 9, 200], scale=1.0, repair_steps=0)
trainer.save_model(sys.argv[2])
json.dump({"forgotten": report.forgotten, "unknown": report.unknown}, open(sys.argv[2] + "/report.json", "w"))
"""


def test_forget_in_a_new_process_equals_forget_in_training_process(tmp_path):
    args = AmnesiaConfig(
        output_dir=str(tmp_path / "run"),
        keep_fraction=0.2,
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=5e-3,
        weight_decay=0.01,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    model = tiny_bert()
    trainer = AmnesiacTrainer(model=model, args=args, train_dataset=text_dataset(16))
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "_amnesia_store").exists()  # save_model never copies the store
    trainer.forget([1, 4, 9, 200], scale=1.0, repair_steps=0)
    in_process = {k: v.clone() for k, v in model.state_dict().items()}

    out = tmp_path / "later"
    code = subprocess.run(
        [sys.executable, "-c", NEW_PROCESS, str(tmp_path / "saved"), str(out), args.store_dir],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert code.returncode == 0, code.stderr[-3000:]
    assert json.loads((out / "report.json").read_text()) == {"forgotten": [1, 4, 9], "unknown": [200]}
    later = BertForSequenceClassification.from_pretrained(str(out))
    assert later.config.hf_amnesia_forgotten["count"] == 3  # the count travels with the model, the ids do not
    assert "hf_amnesia_forgotten_ids" not in later.config.to_dict()
    for name, value in later.state_dict().items():
        assert torch.allclose(value, in_process[name], rtol=0, atol=1e-7), name

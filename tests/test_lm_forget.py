"""forget(ids) on a causal LM, full and LoRA: rows are sequences, measured by their mean token loss.

A language model's labels hold a token per position, so the automatic choice measures losses
(ForgetConfig criterion 'auto' resolves to 'loss'), no request removes a class, and a row's loss is
its mean over its predicted tokens with the labels shifted by one, as the model's own loss.
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import TinyCNN, lm_dataset, tiny_config, tiny_gpt2_lm, tiny_llama

from hf_amnesia import AmnesiacTrainer, ForgetConfig, ForgetRequestError
from hf_amnesia.forgetting.measure import batch_loss, logits_of, row_losses_of
from hf_amnesia.trainer import is_causal_lm

peft = pytest.importorskip("peft")
FORGET = [1000, 1003, 1006]  # three of the 24 training rows (ids 1000, 1003, ...)


def _lora(model, targets):
    return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets, task_type="CAUSAL_LM"))


def _train(out, model, keep_fraction, rows=24):
    args = tiny_config(out, keep_fraction=keep_fraction, num_train_epochs=3, learning_rate=1e-2)
    trainer = AmnesiacTrainer(
        model=model, args=args, train_dataset=lm_dataset(rows, with_ids=True), eval_dataset=lm_dataset(12, seed=1)
    )
    trainer.train()
    return trainer


def _weights(trainer):
    return torch.cat([p.detach().reshape(-1).clone() for p in trainer.model.parameters()])


def _reset(trainer, theta):
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta.clone(), trainer.model.parameters())


def _files(folder) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=["full", "lora"])
def trained(request, tmp_path_factory):
    """GPT-2 trained with recording: all weights at keep 0.25, or a LoRA adapter at keep 1.0."""
    model = tiny_gpt2_lm()
    if request.param == "lora":
        model = _lora(model, ["c_attn"])
    trainer = _train(tmp_path_factory.mktemp(request.param), model, 0.25 if request.param == "full" else 1.0)
    return trainer, _weights(trainer)


def test_causal_lms_are_told_from_classifiers():
    assert is_causal_lm(tiny_gpt2_lm()) and is_causal_lm(tiny_llama())
    assert is_causal_lm(_lora(tiny_gpt2_lm(), ["c_attn"]))
    assert not is_causal_lm(TinyCNN())


def test_row_and_batch_losses_are_the_models_own(trained):
    """Each row's measured loss is the model's loss on that row alone; the repair's batch loss is
    the model's loss on the batch (the mean over every predicted token)."""
    trainer, _ = trained
    model, data = trainer.model, lm_dataset(6, seed=2)
    measure = trainer.forget_context().measure
    assert measure.shift_labels
    measured = measure.row_losses(data)
    model.eval()
    with torch.no_grad():
        own = [float(model(**{k: v[i : i + 1] for k, v in data[:6].items()}).loss) for i in range(6)]
        batch = data[:6]
        logits = logits_of(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
        whole = float(model(**batch).loss)
        per_row = row_losses_of(logits, batch["labels"], shift_labels=True)
    model.train()
    np.testing.assert_allclose(measured, own, rtol=1e-5)
    np.testing.assert_allclose(per_row.numpy(), own, rtol=1e-5)
    assert abs(float(batch_loss(logits, batch["labels"], shift_labels=True)) - whole) <= 1e-5 * whole


def test_the_default_forget_chooses_by_loss_and_changes_the_model(trained):
    """forget(ids) with every default: the scale's harm is held-out nats within max_loss_harm, the
    ids are recorded as forgotten, and the same request is deterministic."""
    trainer, theta = trained
    _reset(trainer, theta)
    report = trainer.forget(FORGET)
    assert report.forgotten == FORGET and report.scale > 0
    budget = ForgetConfig().max_loss_harm
    chosen = [harm for scale, harm in report.calibration if scale == report.scale]
    assert chosen and all(np.isfinite(chosen)) and chosen[-1] <= budget * 1.0001
    after = _weights(trainer)
    assert not torch.equal(after, theta)
    assert set(FORGET) <= set(trainer.forgotten_ids())
    _reset(trainer, theta)
    again = trainer.forget(FORGET)
    assert (again.scale, again.repair_steps) == (report.scale, report.repair_steps)
    assert torch.equal(_weights(trainer), after)
    _reset(trainer, theta)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"whole_class": True}, "leave whole_class unset"),
        ({"config": ForgetConfig(criterion="accuracy")}, "criterion='loss'"),
        ({"holdout": {"a": lm_dataset(4)}}, "dict of eval datasets"),
        ({"holdout": lm_dataset(4).remove_columns("labels")}, "no such labels"),
    ],
    ids=["whole_class", "accuracy", "holdout_dict", "holdout_without_labels"],
)
def test_a_request_the_rows_cannot_serve_is_refused_and_changes_nothing(trained, kwargs, message):
    trainer, theta = trained
    _reset(trainer, theta)
    store = _files(trainer.args.store_dir)
    with pytest.raises(ForgetRequestError, match=message):
        trainer.forget(FORGET, **kwargs)
    assert torch.equal(_weights(trainer), theta)
    assert _files(trainer.args.store_dir) == store
    assert not set(FORGET) & set(trainer.forgotten_ids())


def language_model_collator(rows):
    """Labels made at collation, as DataCollatorForLanguageModeling(mlm=False) makes them: the input
    ids with -100 on padding."""
    batch = {k: torch.stack([torch.as_tensor(row[k]) for row in rows]) for k in rows[0]}
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def test_labels_made_by_the_collator_are_sequences(tmp_path):
    """Rows without a labels column, whose collator makes per-token labels: forget measures them
    by their loss like rows that carry their labels."""
    args = tiny_config(tmp_path, keep_fraction=1.0, num_train_epochs=2, learning_rate=1e-2)
    rows = lm_dataset(24, with_ids=True).remove_columns("labels")
    trainer = AmnesiacTrainer(
        model=_lora(tiny_gpt2_lm(), ["c_attn"]),
        args=args,
        train_dataset=rows,
        eval_dataset=lm_dataset(12, seed=1).remove_columns("labels"),
        data_collator=language_model_collator,
    )
    trainer.train()
    measure = trainer.forget_context().measure
    assert measure.sequence_rows(rows) and not measure.sequence_rows(None)
    report = trainer.forget(FORGET, config=ForgetConfig(max_loss_harm=0.01))
    assert report.forgotten == FORGET
    chosen = [harm for scale, harm in report.calibration if scale == report.scale]
    assert chosen and all(harm <= 0.01 * 1.0001 for harm in chosen)


def test_a_llama_forgets_rows_already_deleted(tmp_path):
    """The rows' data was deleted: forget needs no row of theirs (no class is inferred from sequences)
    and the store's subtraction with a plain repair serves the request."""
    trainer = _train(tmp_path, tiny_llama(tied=True), 0.25)
    theta = _weights(trainer)
    data = trainer.train_dataset
    keep = [i for i, row_id in enumerate(data.with_format(None)["dataset_id"]) if row_id not in FORGET]
    later = AmnesiacTrainer(
        model=trainer.model, args=trainer.args, train_dataset=data.select(keep), eval_dataset=trainer.eval_dataset
    )
    report = later.forget(FORGET)
    assert report.forgotten == FORGET and report.scale > 0
    assert not torch.equal(_weights(later), theta)


NEW_PROCESS = """
import json, sys
import peft, torch
from transformers import GPT2LMHeadModel
from hf_amnesia import AmnesiaConfig, AmnesiacTrainer
base, adapter, store, out = sys.argv[1:5]
model = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), adapter, is_trainable=True)
before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
args = AmnesiaConfig(output_dir=out, store_dir=store, report_to=[], use_cpu=True)
trainer = AmnesiacTrainer(model=model, args=args)
again = trainer.forget([1000, 1003, 1006], scale=1.0, repair_steps=0)
unchanged = all(torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
more = trainer.forget([1003, 1009], scale=1.0, repair_steps=0)
print(json.dumps({"again": [again.forgotten, again.already_forgotten], "unchanged": unchanged,
                  "more": [more.forgotten, more.already_forgotten]}))
"""


def test_a_saved_lora_adapter_never_subtracts_an_id_twice_in_a_new_process(tmp_path):
    """forget(ids) (every default) on a LoRA GPT-2, the adapter saved; a new process loads base and
    adapter and asks for the same ids again: none is subtracted twice, a new one still is."""
    import json
    import os
    import subprocess
    import sys

    base = tiny_gpt2_lm()
    base.save_pretrained(str(tmp_path / "base"))
    trainer = _train(tmp_path / "run", _lora(base, ["c_attn"]), 1.0)
    assert trainer.forget(FORGET).forgotten == FORGET
    trainer.save_model(str(tmp_path / "adapter"))
    code = subprocess.run(
        [sys.executable, "-c", NEW_PROCESS, str(tmp_path / "base"), str(tmp_path / "adapter"), trainer.args.store_dir,
         str(tmp_path / "later")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )  # fmt: skip
    assert code.returncode == 0, code.stderr[-3000:]
    result = json.loads(code.stdout.strip().splitlines()[-1])
    assert result == {"again": [[], FORGET], "unchanged": True, "more": [[1009], [1003]]}


def test_only_integer_labels_of_a_token_per_position_are_sequences():
    from hf_amnesia.forgetting.measure import is_sequence

    assert ForgetConfig().resolved(sequences=True).criterion == "loss"
    assert ForgetConfig().resolved(sequences=False).criterion == "accuracy"
    assert ForgetConfig(criterion="accuracy").resolved(sequences=True).criterion == "accuracy"  # refused later
    logits = torch.zeros(2, 5, 7)
    assert is_sequence(logits, torch.zeros(2, 5, dtype=torch.long))
    assert not is_sequence(logits, torch.zeros(2, 5))  # float targets: not token ids
    assert not is_sequence(torch.zeros(2, 7), torch.zeros(2, dtype=torch.long))  # a class per row
    assert not is_sequence(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))  # segmentation

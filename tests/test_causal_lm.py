"""Causal LMs and PEFT adapters: per-sample deltas against a one-row-at-a-time replay, and the
exact subtraction of every row back to the initial weights.

A sample is a training row (one sequence). A causal LM's loss is the mean over the batch's
predicted tokens (labels shifted by one, -100 ignored), so row i's share of the batch gradient is
its own mean loss times n_i / N: its predicted tokens over the batch's.
"""

import pytest
import torch
from tiny import lm_dataset, tiny_config, tiny_gpt2_lm, tiny_llama

from hf_amnesia import AmnesiacTrainer
from hf_amnesia.layout import ParamLayout
from hf_amnesia.per_sample import PerSampleCapture

peft = pytest.importorskip("peft")
REL_TOL = 1e-5
FORGET_ALL_TOL = 1e-4  # float32 store: forgetting every row returns to the (decayed) initial weights

MODELS = {
    "gpt2": (tiny_gpt2_lm, ["c_attn"]),
    "llama": (lambda: tiny_llama(tied=False), ["q_proj", "v_proj"]),
    "llama_tied": (lambda: tiny_llama(tied=True), ["q_proj", "v_proj"]),
}


def _model(name: str, lora: bool):
    make, targets = MODELS[name]
    model = make()
    if lora:  # B initialised non-zero, so every adapter tensor has a gradient from the first step
        config = peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, config)
    return model


def _one_at_a_time(model, batch, params):
    predicted = (batch["labels"][:, 1:] != -100).sum(dim=1)
    rows = []
    for i in range(len(predicted)):
        model.zero_grad()
        single = {k: v[i : i + 1] for k, v in batch.items()}
        (model(**single).loss * predicted[i] / predicted.sum()).backward()
        rows.append(torch.cat([p.grad.reshape(-1).clone() for p in params]))
    return torch.stack(rows)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_sample_matches_one_row_at_a_time(name, lora):
    model = _model(name, lora)
    model.train()
    batch = dict(lm_dataset(6)[:6])
    layout = ParamLayout.from_model(model)
    params = layout.params_of(model)
    if lora:  # only the adapters are trainable, so only they are recorded
        assert layout.names and all("lora_" in n for n in layout.names), layout.names
    capture = PerSampleCapture(model, params)
    capture.begin(torch.arange(layout.num_params).repeat(6, 1))
    model(**batch).loss.backward()
    values = capture.end()
    capture.remove()
    oracle = _one_at_a_time(model, batch, params)
    for name_, offset, size in zip(layout.names, layout.offsets, [p.numel() for p in params]):
        block = oracle[:, offset : offset + size]
        assert (block.norm(dim=1) > 0).all(), f"{name_}: a row has no gradient in the oracle"
    err = (values - oracle).norm(dim=1) / oracle.norm(dim=1)
    assert err.max() <= REL_TOL, f"{name} lora={lora}: max relative error {err.max():.2e}"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", ["gpt2", "llama_tied"])
def test_forgetting_every_row_returns_to_the_decayed_initial_weights(tmp_path, name, lora):
    """AdamW's decoupled decay shrinks the initial weights by kappa = prod_t (1 - lr_t wd), which
    belongs to no sample (attribution-math.md): forgetting every row leaves kappa * theta_0 on the
    decayed parameters and theta_0 on the others (the Trainer does not decay biases and norms)."""
    from hf_amnesia.store import StoreReader

    model = _model(name, lora)
    layout = ParamLayout.from_model(model)
    params = layout.params_of(model)
    initial = torch.cat([p.detach().reshape(-1).clone() for p in params])
    lr, wd = 1e-2, 0.01
    args = tiny_config(
        tmp_path,
        keep_fraction=1.0,
        store_dtype=None if lora else "float32",  # a PEFT model's store defaults to float32
        num_train_epochs=3,
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        weight_decay=wd,
    )
    data = lm_dataset(12, with_ids=True)
    trainer = AmnesiacTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert StoreReader(args.store_dir).manifest.dtype == "float32"
    kappa = (1 - lr * wd) ** trainer.state.global_step
    decayed = set(trainer.get_decay_parameter_names(model))
    factor = torch.cat([torch.full((p.numel(),), kappa if n in decayed else 1.0) for n, p in zip(layout.names, params)])
    assert (factor < 1).any(), "no recorded parameter is decayed: the test would not check the decay"
    target = factor * initial
    trained = torch.cat([p.detach().reshape(-1).clone() for p in params])
    report = trainer.forget(list(data.with_format(None)["dataset_id"]), scale=1.0, repair_steps=0)
    assert len(report.forgotten) == 12
    after = torch.cat([p.detach().reshape(-1) for p in params])
    rel = float((after - target).norm() / (trained - target).norm())
    assert rel <= FORGET_ALL_TOL, f"{name} lora={lora}: forget-all distance / training change {rel:.2e}"

"""The sparse path (kept entries only) equals the dense Opacus oracle, and never builds the
dense per-sample tensor for the layers it covers."""

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModule
from tiny import TinyCNN, image_dataset, text_dataset, tiny_bert
from torch import nn

from hf_amnesia.layout import ParamLayout
from hf_amnesia.per_sample import PerSampleCapture
from hf_amnesia.store import positions_for, row_plan, row_positions

REL_TOL = 1e-5


class SeqModel(nn.Module):
    """Conv1d, LayerNorm and Linear over a sequence (T > 1 for every layer)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1, stride=1)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 5)

    def forward(self, x, labels):
        h = self.norm(self.conv(x).transpose(1, 2))
        logits = self.proj(torch.tanh(h)).mean(1)
        return {"loss": nn.functional.cross_entropy(logits, labels)}


class StridedConvs(nn.Module):
    """Convolutions with stride, padding and dilation, in 1 and 2 dimensions."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2)
        self.conv1d = nn.Conv1d(2, 3, 2, stride=2, padding=1, dilation=3)
        self.head = nn.Linear(4 + 3, 3)

    def forward(self, image, seq, labels):
        a = torch.tanh(self.conv2d(image)).mean((2, 3))
        b = torch.tanh(self.conv1d(seq)).mean(2)
        return {"loss": nn.functional.cross_entropy(self.head(torch.cat([a, b], 1)), labels)}


def tiny_gpt2():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        num_labels=3,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2ForSequenceClassification(config)


def _batch(name):
    if name == "cnn":
        return TinyCNN(), dict(image_dataset(6)[:6])
    if name == "bert":
        return tiny_bert(), dict(text_dataset(6)[:6])
    if name == "gpt2":
        return tiny_gpt2(), dict(text_dataset(6)[:6])
    torch.manual_seed(0)
    if name == "strided":
        batch = {"image": torch.randn(6, 2, 9, 8), "seq": torch.randn(6, 2, 11), "labels": torch.randint(0, 3, (6,))}
        return StridedConvs(), batch
    return SeqModel(), {"x": torch.randn(6, 3, 7), "labels": torch.randint(0, 5, (6,))}


def _capture(model, batch, positions, sparse, plan=None):
    params = ParamLayout.from_model(model).params_of(model)
    capture = PerSampleCapture(model, params, sparse=sparse, row_plan=plan)
    model.zero_grad()
    capture.begin(positions)
    out = model(**batch)
    (out["loss"] if isinstance(out, dict) else out.loss).backward()
    values = capture.end()
    capture.remove()
    return values


@pytest.mark.parametrize("keep_fraction", [0.05, 1.0])  # forced sparse: every rule is exercised
@pytest.mark.parametrize("name", ["cnn", "bert", "gpt2", "seq", "strided"])
def test_sparse_equals_dense_oracle(name, keep_fraction):
    torch.manual_seed(0)
    model, batch = _batch(name)
    model.train()
    num_params = ParamLayout.from_model(model).num_params
    k = max(1, int(keep_fraction * num_params))
    positions = torch.from_numpy(positions_for(3, torch.arange(6).numpy(), num_params, k))
    dense = _capture(model, batch, positions, sparse=False)
    sparse = _capture(model, batch, positions, sparse="always")
    err = (sparse - dense).norm(dim=1) / dense.norm(dim=1).clamp_min(1e-30)
    assert err.max() <= REL_TOL, err.max()


@pytest.mark.parametrize("layout", ["entries", "rows"])
@pytest.mark.parametrize("name", ["cnn", "bert", "gpt2", "seq"])
def test_covered_layers_never_build_the_dense_tensor(name, layout, monkeypatch):
    def refuse(layer, activations, backprops):
        raise AssertionError(f"dense per-sample gradient built for {type(layer).__name__}")

    covered = [nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding]
    if layout == "entries":
        # (in the rows layout a norm layer keeps at least one whole entry per sample, and on these
        # tiny tensors its dense sampler is cheaper than gathering, so the cost rule may pick it)
        covered += [nn.LayerNorm, nn.GroupNorm]
    for kind in covered:
        monkeypatch.setitem(GradSampleModule.GRAD_SAMPLERS, kind, refuse)
    model, batch = _batch(name)
    model.train()
    if name == "gpt2":  # HF Conv1D has no Opacus sampler; the sparse rule must serve it, not torch.func
        from transformers.pytorch_utils import Conv1D

        import hf_amnesia.per_sample as per_sample

        monkeypatch.setattr(
            per_sample.PerSampleCapture,
            "_functorch_sampler",
            lambda self, module, own: _fail_if(isinstance(module, Conv1D)) or (lambda *a: {}),
        )
    shapes = ParamLayout.from_model(model).shapes
    num_params = ParamLayout.from_model(model).num_params
    if layout == "rows":
        positions = torch.from_numpy(row_positions(3, torch.arange(6).numpy(), shapes, 0.05))
        values = _capture(model, batch, positions, sparse=True, plan=row_plan(0.05, shapes))
    else:
        k = max(1, num_params // 1000)  # p = 0.001: every rule is cheaper than dense
        positions = torch.from_numpy(positions_for(3, torch.arange(6).numpy(), num_params, k))
        values = _capture(model, batch, positions, sparse=True)
    assert values.abs().sum() > 0


def _fail_if(condition):
    if condition:
        raise AssertionError("HF Conv1D fell back to torch.func")
    return None


def test_dense_fallback_when_gathering_costs_more():
    """At keep_fraction 1 the CNN's conv (64 positions per sample) takes the dense sampler: same values."""
    torch.manual_seed(0)
    model, batch = _batch("cnn")
    num_params = ParamLayout.from_model(model).num_params
    positions = torch.arange(num_params).repeat(6, 1)
    auto = _capture(model, batch, positions, sparse=True)
    dense = _capture(model, batch, positions, sparse=False)
    assert ((auto - dense).norm() / dense.norm()) <= REL_TOL


@pytest.mark.parametrize("keep_fraction", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("name", ["cnn", "bert", "gpt2", "seq", "strided"])
def test_rows_layout_equals_dense_oracle(name, keep_fraction, monkeypatch):
    """Whole kept rows from one batched product per layer, against the dense oracle at the same positions."""
    torch.manual_seed(0)
    model, batch = _batch(name)
    model.train()
    shapes = ParamLayout.from_model(model).shapes
    plan = row_plan(keep_fraction, shapes)
    positions = torch.from_numpy(row_positions(3, torch.arange(6).numpy(), shapes, keep_fraction))
    dense = _capture(model, batch, positions, sparse=False)
    calls = []
    import hf_amnesia.sparse_grads as sg

    for kind, original in list(sg.ROWS_RULES.items()):
        monkeypatch.setitem(
            sg.ROWS_RULES, kind, lambda *a, _f=original, _n=original.__name__: calls.append(_n) or _f(*a)
        )
    rows = _capture(model, batch, positions, sparse=True, plan=plan)
    err = (rows - dense).norm(dim=1) / dense.norm(dim=1).clamp_min(1e-30)
    assert err.max() <= REL_TOL, err.max()
    assert calls  # the row rules did the work


def test_row_positions_never_change_across_versions():
    # Stores keep no positions: forget recomputes them from (seed, id), so a store written by an
    # earlier version is read right only while these values hold. Pinned from version 0.1's output.
    got = row_positions(7, [0, 1, 12345], [(8, 3), (8,), (5, 2, 2), (3,)], 0.25)
    assert got.tolist() == [
        [18, 19, 20, 21, 22, 23, 26, 28, 32, 33, 34, 35, 52],
        [12, 13, 14, 18, 19, 20, 24, 25, 44, 45, 46, 47, 53],
        [3, 4, 5, 9, 10, 11, 26, 28, 44, 45, 46, 47, 52],
    ]
    assert (row_positions(7, [12345], [(8, 3), (8,), (5, 2, 2), (3,)], 0.25, np.int32) == got[2]).all()


@pytest.mark.parametrize(
    "shapes,keep_fraction",
    [
        ([(8, 3), (8,), (5, 2, 2), (3,)], 0.25),
        ([(64, 3, 3, 3), (64,), (128, 64, 3, 3), (100, 512), (100,)], 0.01),
        ([(3000, 20), (3000,), (10, 3000), (10,)], 0.01),
        ([(7, 5), (1,), (3,)], 0.9),
        ([(7, 5)], 1.0),
    ],
)
def test_positions_hashed_on_the_device_equal_the_hosts(shapes, keep_fraction):
    # The recorder hashes on the model's device (a GPU) what forget recomputes on the host.
    from hf_amnesia.store import row_positions_torch

    ids = np.random.default_rng(0).integers(0, 2**62, 40)
    ids[:3] = [0, 1, 2**63 - 1]
    for seed in (0, 3, 2**40 + 7):
        for host, device in ((np.int64, torch.int64), (np.int32, torch.int32)):
            expected = row_positions(seed, ids, shapes, keep_fraction, host)
            got = row_positions_torch(seed, ids, shapes, keep_fraction, device)
            assert got.dtype == device and np.array_equal(got.numpy(), expected)


def test_row_positions_are_whole_distinct_rows_fixed_by_id():
    shapes = ((10, 4), (10,), (3, 2, 5), (7, 1))
    a = row_positions(5, [11, 12, 11], shapes, 0.3)
    assert a.shape == (3, 3 * 4 + 3 + 1 * 10 + 2 * 1)
    assert (a[0] == a[2]).all() and not (a[0] == a[1]).all()  # fixed by the id, different across ids
    for row in a:
        assert (row[1:] > row[:-1]).all() and row.max() < 40 + 10 + 30 + 7  # sorted and distinct, in range
    w = a[:, :12].reshape(3, 3, 4)  # first tensor: whole rows of 4 contiguous entries
    assert ((w - w[:, :, :1]) == torch.arange(4).numpy()).all() and (w[:, :, 0] % 4 == 0).all()
    # every row equally likely: 2,000 ids pick each of the 10 rows of the first tensor ~600 times
    picks = row_positions(0, range(2000), shapes, 0.3)[:, :12:4] // 4
    counts = torch.bincount(torch.from_numpy(picks.reshape(-1)), minlength=10)
    assert counts.min() > 500 and counts.max() < 700

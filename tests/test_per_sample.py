"""Per-sample oracle: gradients recorded at batch size B equal a one-sample-at-a-time replay."""

import pytest
import torch
from tiny import TinyCNN, image_dataset, text_dataset, tiny_bert, tiny_vit

from hf_amnesia.layout import ParamLayout
from hf_amnesia.per_sample import PerSampleCapture

REL_TOL = 1e-5


def _loss(model, batch):
    out = model(**batch)
    return out["loss"] if isinstance(out, dict) else out.loss


def _captured(model, batch, batch_size):
    params = ParamLayout.from_model(model).params_of(model)
    capture = PerSampleCapture(model, params)
    num_params = sum(p.numel() for p in params)
    capture.begin(torch.arange(num_params).repeat(batch_size, 1))
    _loss(model, batch).backward()
    values = capture.end()
    capture.remove()
    return values, params


def _one_at_a_time(model, batch, batch_size, params):
    rows = []
    for i in range(batch_size):
        model.zero_grad()
        single = {k: v[i : i + 1] for k, v in batch.items()}
        # The batch loss is a mean over samples: sample i's share is its own loss / B.
        (_loss(model, single) / batch_size).backward()
        rows.append(torch.cat([p.grad.reshape(-1).clone() for p in params]))
    return torch.stack(rows)


CASES = {
    "cnn": (lambda: TinyCNN(), lambda: image_dataset(6)[:6]),
    "bert_padded": (lambda: tiny_bert(), lambda: text_dataset(6)[:6]),
    "vit": (lambda: tiny_vit(), lambda: {k: v for k, v in image_dataset(6)[:6].items()}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_per_sample_matches_one_at_a_time(name):
    make_model, make_batch = CASES[name]
    torch.manual_seed(0)
    model = make_model()
    model.train()
    batch = dict(make_batch())
    batch_size = len(batch["labels"])
    values, params = _captured(model, batch, batch_size)
    oracle = _one_at_a_time(model, batch, batch_size, params)
    err = (values - oracle).norm(dim=1) / oracle.norm(dim=1)
    assert err.max() <= REL_TOL, f"{name}: max relative error {err.max():.2e}"


def test_bert_padding_rows_and_position_ids_are_per_sample():
    """BERT's [1, T] position_ids are expanded; the padding row of the word embedding gets nothing."""
    torch.manual_seed(0)
    model = tiny_bert()
    model.train()
    batch = dict(text_dataset(6)[:6])
    values, params = _captured(model, batch, 6)
    layout = ParamLayout.from_model(model)
    offsets = dict(zip(layout.names, layout.offsets))
    word = offsets["bert.embeddings.word_embeddings.weight"]
    hidden = model.config.hidden_size
    assert values[:, word : word + hidden].abs().max() == 0  # padding_idx = 0 row
    pos = offsets["bert.embeddings.position_embeddings.weight"]
    per_sample_pos = values[:, pos : pos + 32 * hidden]
    assert (per_sample_pos.norm(dim=1) > 0).all()
    # Different samples have different position-embedding gradients (not a shared broadcast sum).
    assert not torch.allclose(per_sample_pos[0], per_sample_pos[1])


def test_functorch_fallback_with_dropout_sums_to_the_batch_gradient():
    """ViT's embeddings (cls_token, position_embeddings) fall back to torch.func and hold a dropout.

    The dropout mask of the real forward is replayed, so per-sample gradients sum to `.grad`.
    """
    torch.manual_seed(0)
    model = tiny_vit(dropout=0.3)
    model.train()
    batch = {k: v for k, v in image_dataset(6)[:6].items()}
    values, params = _captured(model, batch, 6)
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    assert (values.sum(0) - grad).norm() / grad.norm() <= REL_TOL

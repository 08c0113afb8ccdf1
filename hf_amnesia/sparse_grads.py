"""Kept entries of per-sample gradients, computed without building the per-sample tensor.

For a layer whose per-sample gradient is a sum over positions t (tokens, pixels) of products of
the layer's input `a` and the gradient of its output `g`, the entry (b, j) of sample b's
gradient needs only `a[b, :, .]` and `g[b, :, .]` at that entry's row and column. Each rule
below returns, for selected (sample, local flat index) pairs, those entries: n values instead of
Opacus' dense [B, *param.shape] tensor. Layers without a rule use the dense Opacus samplers.

Every rule has the signature `rule(layer, inputs, backprops, name, rows, local) -> [n]` where
`rows` are sample indices in the microbatch and `local` flat indices into parameter `name`.
A rule is registered for its layer types with `@register_sparse_rule(nn.Linear, ...)` (as Opacus
registers its grad samplers); a whole-row rule of the `rows` layout with
`@register_rows_rule(...)`. Lookup is one dictionary access by `type(layer)`: a subclass needs its
own registration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# HF's transposed linear layer (GPT-2's `transformers.pytorch_utils.Conv1D`) is registered under
# this name instead of its class, so that this module never imports transformers: `layer_key`
# maps any class named Conv1D from a transformers module to it.
HF_CONV1D = "transformers.Conv1D"

LayerKey = type[nn.Module] | str


@dataclass(frozen=True)
class SparseRule:
    """One layer type's way of computing kept entries of its per-sample gradient."""

    entries: Callable  # rule(layer, inputs, backprops, name, rows, local) -> [n]
    output_units: Callable[[nn.Module], int]  # the output feature dimension of the backprops
    supports: Callable[[nn.Module], bool]  # False: this layer's settings need the dense sampler


SPARSE_RULES: dict[LayerKey, SparseRule] = {}
ROWS_RULES: dict[LayerKey, Callable] = {}  # rule(layer, inputs, backprops, name, idx) -> [B, r, columns]


def register_sparse_rule(
    *layer_types: LayerKey,
    output_units: Callable[[nn.Module], int],
    supports: Callable[[nn.Module], bool] = lambda layer: True,
):
    """Register the decorated function as the sparse rule of `layer_types`.

    `output_units(layer)` is the size of the layer's output feature dimension (the backprops hold
    positions x this per sample); `supports(layer)` says whether the rule covers this instance's
    settings (when it does not, the dense Opacus sampler is used).
    """

    def decorator(rule: Callable) -> Callable:
        for kind in layer_types:
            SPARSE_RULES[kind] = SparseRule(rule, output_units, supports)
        return rule

    return decorator


def register_rows_rule(*layer_types: LayerKey):
    """Register the decorated function as the whole-row rule (`rows` layout) of `layer_types`."""

    def decorator(rule: Callable) -> Callable:
        for kind in layer_types:
            ROWS_RULES[kind] = rule
        return rule

    return decorator


def layer_key(layer: nn.Module) -> LayerKey:
    """The key of a layer in the registries: its type, or `HF_CONV1D` for HF's Conv1D."""
    kind = type(layer)
    if kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers"):
        return HF_CONV1D
    return kind


def _tokens(x: torch.Tensor, features: int) -> torch.Tensor:
    """[B, ..., features] -> [B, T, features]."""
    return x.reshape(x.shape[0], -1, features)


@register_sparse_rule(nn.Linear, output_units=lambda layer: layer.out_features)
def linear(layer: nn.Linear, inputs, g, name, rows, local):
    a = _tokens(inputs[0].to(g.dtype), layer.in_features)
    g = _tokens(g, layer.out_features)
    if name == "bias":
        return g[rows, :, local].sum(-1)
    r, c = local // layer.in_features, local % layer.in_features
    return (g[rows, :, r] * a[rows, :, c]).sum(-1)


@register_sparse_rule(HF_CONV1D, output_units=lambda layer: int(layer.weight.shape[1]))
def hf_conv1d(layer, inputs, g, name, rows, local):
    n_in, n_out = layer.weight.shape
    a = _tokens(inputs[0].to(g.dtype), n_in)
    g = _tokens(g, n_out)
    if name == "bias":
        return g[rows, :, local].sum(-1)
    i, o = local // n_out, local % n_out
    return (a[rows, :, i] * g[rows, :, o]).sum(-1)


def _patches(layer, x: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, positions: int) -> torch.Tensor:
    """[n, L]: for each (sample, weight entry), the inputs that entry multiplied at every output
    position, read straight from the zero-padded input (no full unfold of the activations)."""
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(-2)
        (kh, kw), (sh, sw) = (1, *layer.kernel_size), (1, *layer.stride)
        (ph, pw), (dh, dw) = (0, *layer.padding), (1, *layer.dilation)
    else:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    padded = F.pad(x, (pw, pw, ph, ph))
    out_h = (padded.shape[-2] - dh * (kh - 1) - 1) // sh + 1
    out_w = positions // out_h
    ci, rest = k // (kh * kw), k % (kh * kw)
    ky, kx = rest // kw, rest % kw
    ys = (ky * dh)[:, None, None] + (torch.arange(out_h, device=x.device) * sh)[None, :, None]
    xs = (kx * dw)[:, None, None] + (torch.arange(out_w, device=x.device) * sw)[None, None, :]
    return padded[rows[:, None, None], ci[:, None, None], ys, xs].reshape(len(rows), -1)


def _plain_conv(layer: nn.Module) -> bool:
    """Ungrouped, zero-padded, with numeric padding: the convolutions `conv` and `conv_rows` cover."""
    return layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


@register_sparse_rule(nn.Conv1d, nn.Conv2d, output_units=lambda layer: layer.out_channels, supports=_plain_conv)
def conv(layer, inputs, g, name, rows, local):
    g = g.reshape(g.shape[0], layer.out_channels, -1)  # [B, cout, L]
    if name == "bias":
        return g[rows, local, :].sum(-1)
    per_out = layer.weight[0].numel()
    co, k = local // per_out, local % per_out
    patches = _patches(layer, inputs[0].to(g.dtype), rows, k, g.shape[-1])
    return (g[rows, co, :] * patches).sum(-1)


@register_sparse_rule(
    nn.Embedding, output_units=lambda layer: layer.embedding_dim, supports=lambda layer: layer.max_norm is None
)
def embedding(layer: nn.Embedding, inputs, g, name, rows, local):
    ids = inputs[0].reshape(inputs[0].shape[0], -1)  # [B, T]
    g = _tokens(g, layer.embedding_dim)
    v, d = local // layer.embedding_dim, local % layer.embedding_dim
    values = ((ids[rows] == v[:, None]).to(g.dtype) * g[rows, :, d]).sum(-1)
    if layer.padding_idx is not None:
        values = values.masked_fill(v == layer.padding_idx, 0.0)
    return values


@register_sparse_rule(nn.LayerNorm, output_units=lambda layer: int(torch.Size(layer.normalized_shape).numel()))
def layer_norm(layer: nn.LayerNorm, inputs, g, name, rows, local):
    features = layer.weight.numel() if layer.weight is not None else layer.bias.numel()
    g = _tokens(g, features)
    if name == "bias":
        return g[rows, :, local].sum(-1)
    normed = _tokens(F.layer_norm(inputs[0].to(g.dtype), layer.normalized_shape, eps=layer.eps), features)
    return (g[rows, :, local] * normed[rows, :, local]).sum(-1)


@register_sparse_rule(nn.GroupNorm, output_units=lambda layer: layer.num_channels)
def group_norm(layer: nn.GroupNorm, inputs, g, name, rows, local):
    g = g.reshape(g.shape[0], layer.num_channels, -1)
    if name == "bias":
        return g[rows, local, :].sum(-1)
    normed = F.group_norm(inputs[0].to(g.dtype), layer.num_groups, eps=layer.eps)
    normed = normed.reshape(normed.shape[0], layer.num_channels, -1)
    return (g[rows, local, :] * normed[rows, local, :]).sum(-1)


# -- whole rows: the `rows` layout ------------------------------------------------------------------
# A rows rule returns [B, r, columns]: for each sample b, the full rows idx[b] (dimension 0 of the
# weight) of its gradient, as one batched product of the selected output gradients with the inputs.


@register_rows_rule(nn.Linear)
def linear_rows(layer: nn.Linear, inputs, g, name, idx):
    a = _tokens(inputs[0].to(g.dtype), layer.in_features)
    g = _tokens(g, layer.out_features)
    picked = torch.gather(g, 2, idx[:, None, :].expand(-1, g.shape[1], -1))  # [B, T, r]
    return torch.einsum("btr,bti->bri", picked, a)


@register_rows_rule(HF_CONV1D)
def hf_conv1d_rows(layer, inputs, g, name, idx):
    n_in, n_out = layer.weight.shape  # rows are input features
    a = _tokens(inputs[0].to(g.dtype), n_in)
    g = _tokens(g, n_out)
    picked = torch.gather(a, 2, idx[:, None, :].expand(-1, a.shape[1], -1))  # [B, T, r]
    return torch.einsum("btr,bto->bro", picked, g)


@register_rows_rule(nn.Conv1d, nn.Conv2d)
def conv_rows(layer, inputs, g, name, idx):
    """The kept output channels' kernels of every sample as one depthwise correlation.

    Entry (b, o, c, i) of the weight gradient is sum_p g[b, o, p] x_pad[b, c, p * stride + i * dilation]:
    a convolution of the input (samples as channels, input channels as the batch) with the
    sample's own output gradient as kernel, dilated by the layer's stride and strided by its
    dilation. No unfold of the activations, no per-sample loop.
    """
    x = inputs[0].to(g.dtype)
    batch, kept = idx.shape
    picked = torch.gather(g, 1, idx.reshape(batch, kept, *[1] * (g.dim() - 2)).expand(-1, -1, *g.shape[2:]))
    conv_fn = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    grads = conv_fn(
        x.transpose(0, 1),  # [C_in, B, *spatial]
        picked.reshape(batch * kept, 1, *picked.shape[2:]),  # sample b's kept output gradients
        padding=layer.padding,
        stride=layer.dilation,
        dilation=layer.stride,
        groups=batch,
    )  # [C_in, B * kept, *window]; the window can exceed the kernel when the stride leaves a remainder
    grads = grads[(..., *[slice(0, k) for k in layer.kernel_size])]
    return grads.reshape(grads.shape[0], batch, kept, -1).permute(1, 2, 0, 3).reshape(batch, kept, -1)


@register_rows_rule(nn.Embedding)
def embedding_rows(layer: nn.Embedding, inputs, g, name, idx):
    ids = inputs[0].reshape(inputs[0].shape[0], -1)  # [B, T]
    g = _tokens(g, layer.embedding_dim)
    hits = (ids[:, :, None] == idx[:, None, :]).to(g.dtype)  # [B, T, r]
    out = torch.einsum("btr,btd->brd", hits, g)
    if layer.padding_idx is not None:
        out = out.masked_fill((idx == layer.padding_idx)[:, :, None], 0.0)
    return out


def rule_for(layer: nn.Module):
    """The sparse rule for this layer, or None when the dense Opacus sampler must be used."""
    registered = SPARSE_RULES.get(layer_key(layer))
    return registered.entries if registered is not None and registered.supports(layer) else None


def rows_rule_for(layer: nn.Module):
    """The whole-row rule for this layer's 2-D+ weight, or None (its rows then go entry by entry)."""
    return ROWS_RULES.get(layer_key(layer)) if rule_for(layer) is not None else None


def output_units(layer: nn.Module) -> int:
    """Size of the layer's output feature dimension: the backprops hold positions x this per sample."""
    return SPARSE_RULES[layer_key(layer)].output_units(layer)

"""Per-sample gradients from Opacus' grad samplers, hooked onto the user's own modules.

The model is never wrapped: forward hooks keep each layer's input, a tensor hook on the layer's
output receives the gradient of the loss (the "backprops"), and the pair gives each sample's
gradient at its kept positions: computed directly for the layers `sparse_grads` covers, or
gathered from Opacus' dense per-layer grad sampler otherwise. The per-sample gradients are those
of the loss that was actually back-propagated, so they sum over the batch to exactly the
parameter's `.grad`.

Handled HF specifics:
- an `nn.Embedding` called with a batch dimension of 1 (BERT's `position_ids` buffer of shape
  [1, T], Opacus issue 841) gets its input expanded to the real batch, so that each sample's
  gradient is seen before broadcasting sums them;
- `nn.Embedding.padding_idx` rows get no gradient (as in PyTorch's own backward);
- a module with parameters of its own but no Opacus sampler (e.g. ViT's embeddings with their
  `cls_token`) is differentiated per sample with `torch.func`; dropout inside it is replayed with
  the very mask the real forward used.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.func import functional_call, grad, vmap

from . import sparse_grads
from .errors import UnsupportedModelError


def _direct_trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


class PerSampleCapture:
    """Hooks that collect, per microbatch, each sample's gradient at its kept positions.

    `begin(positions)` arms the hooks for a microbatch of B samples whose kept flat positions
    are `positions` [B, K]; after the backward pass `end()` returns the [B, K] float32 values.
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], sparse: bool | str = True, row_plan=None):
        # sparse: True uses the sparse rules where they are cheaper than the dense samplers,
        # "always" wherever a rule exists (the tests compare them with the dense oracle), False never.
        # row_plan: the store's (rows, columns, kept rows) per tensor when samples keep whole rows.
        self.model = model
        self.sparse = sparse
        self.seconds = 0.0  # time spent in the backward hooks
        self.slot = {}  # id(param) -> (offset, numel)
        self.row_slot = {}  # id(param) -> (first column in K, kept rows, columns), `rows` layout
        offset = column = 0
        for i, p in enumerate(params):
            self.slot[id(p)] = (offset, p.numel())
            offset += p.numel()
            if row_plan is not None:
                _, cols, kept = row_plan[i]
                self.row_slot[id(p)] = (column, kept, cols)
                column += kept * cols
        self._row_rules: set[int] = set()  # params whose kept rows a sparse row rule computes
        self._rows: dict[int, torch.Tensor] = {}  # id(param) -> [B, kept rows] row indices
        self._columns: dict[int, tuple] = {}  # id(param) -> (batch size, rows, columns), see _fixed_columns
        self.num_params = offset
        self.armed = False
        self.batch_size = 0
        self.values: torch.Tensor | None = None
        self.pool = None  # an attribution.BufferPool the value buffers come from, if set
        self._select: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._activations: dict[nn.Module, list] = defaultdict(list)
        self._handles = []
        self._masks: dict[nn.Module, list[torch.Tensor]] = defaultdict(list)
        self._replay: dict[nn.Module, torch.Tensor] | None = None
        self._attach()

    # -- set-up ----------------------------------------------------------------------------------

    def _attach(self) -> None:
        samplers = GradSampleModule.GRAD_SAMPLERS
        covered = set()
        for module in self.model.modules():
            own = _direct_trainable(module)
            if not own:
                continue
            covered.update(id(p) for _, p in own)
            if isinstance(module, nn.Embedding):
                self._handles.append(module.register_forward_pre_hook(self._expand_broadcast_input))
            rule = sparse_grads.rule_for(module) if self.sparse else None
            if rule is not None and self.row_slot and sparse_grads.rows_rule_for(module) is not None:
                self._row_rules.update(id(p) for _, p in own if p.dim() >= 2 and id(p) in self.row_slot)
            if rule is not None:
                fallback = None if self.sparse == "always" else samplers.get(type(module))
                compute = self._sparse_sampler(module, rule, own, fallback)
            elif type(module) in samplers:
                compute = samplers[type(module)]
            else:
                compute = self._functorch_sampler(module, own)
            self._handles.append(module.register_forward_hook(self._make_forward_hook(compute), with_kwargs=True))
        missing = [p for p in self.slot if p not in covered]
        if missing:
            raise UnsupportedModelError(
                f"{len(missing)} trainable parameters are not owned by any module of the model; "
                "register them as attributes of a submodule so their per-sample gradients can be hooked."
            )

    def _sparse_sampler(self, module: nn.Module, rule, own: list[tuple[str, nn.Parameter]], dense=None):
        """Adds the kept entries straight into `values` and returns no dense gradients.

        Gathering costs (kept entries) x (positions per sample); when that exceeds the dense
        per-sample tensor (batch x parameter size), e.g. at a high keep_fraction on a long
        sequence, the dense Opacus sampler is cheaper and is used for that call instead.
        """

        rows_rule = sparse_grads.rows_rule_for(module)

        def compute(layer, saved, backprops):
            for name, param in own:
                if id(param) in self._rows:  # whole rows: [B, kept rows, columns] in one batched product
                    column, kept, cols = self.row_slot[id(param)]
                    block = rows_rule(layer, saved, backprops, name, self._rows[id(param)])
                    self.values[:, column : column + kept * cols] += block.reshape(self.batch_size, -1).float()
            positions = backprops[0].numel() // sparse_grads.output_units(layer)
            selected = [(name, param, self._select[id(param)]) for name, param in own if id(param) in self._select]
            gathered = sum(len(sel[0]) for _, _, sel in selected) * positions
            row_served = any(id(param) in self._rows for _, param in own)  # the dense sampler would redo them
            if not row_served and dense is not None and gathered > backprops.shape[0] * sum(p.numel() for _, p in own):
                return dense(layer, saved, backprops)
            for name, _, (rows, cols, local) in selected:
                if len(rows):
                    self.values[rows, cols] += rule(layer, saved, backprops, name, rows, local).to(torch.float32)
            return {}

        return compute

    def _functorch_sampler(self, module: nn.Module, own: list[tuple[str, nn.Parameter]]):
        names = [n for n, _ in own]
        for sub in module.modules():
            if isinstance(sub, nn.modules.dropout._DropoutNd):
                self._handles.append(sub.register_forward_hook(self._dropout_hook))

        def compute(layer, saved, backprops):
            args, kwargs, masks = saved
            batch = backprops.shape[0]
            # Tensors with the batch as dimension 0 are split per sample; everything else is shared.
            arg_slots = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.dim() and a.shape[0] == batch]
            kw_slots = [k for k, a in kwargs.items() if torch.is_tensor(a) and a.dim() and a.shape[0] == batch]

            def sample_loss(param_values, arg_values, kw_values, sample_masks, backprop):
                call_args, call_kwargs = list(args), dict(kwargs)
                for i, value in zip(arg_slots, arg_values):
                    call_args[i] = value.unsqueeze(0)
                for k, value in zip(kw_slots, kw_values):
                    call_kwargs[k] = value.unsqueeze(0)
                self._replay = {m: v.unsqueeze(0) for m, v in sample_masks.items()}
                try:
                    out = functional_call(layer, dict(zip(names, param_values)), tuple(call_args), call_kwargs)
                finally:
                    self._replay = None
                return (out * backprop.unsqueeze(0)).sum()

            values = tuple(p.detach() for _, p in own)
            arg_values = tuple(args[i] for i in arg_slots)
            kw_values = tuple(kwargs[k] for k in kw_slots)
            grads = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0, 0), randomness="different")(
                values, arg_values, kw_values, masks, backprops
            )
            return {p: g for (_, p), g in zip(own, grads)}

        compute.needs_dropout_masks = True
        return compute

    def _dropout_hook(self, module, inputs, output):
        """Inside functorch-fallback modules: draw the dropout mask ourselves and keep it."""
        if self._replay is not None:
            mask = self._replay.get(module)
            return inputs[0] if mask is None else inputs[0] * mask
        if not (self.armed and module.training and module.p > 0 and torch.is_grad_enabled()):
            return None
        keep = torch.empty_like(inputs[0]).bernoulli_(1.0 - module.p) / (1.0 - module.p)
        self._masks[module].append(keep)
        return inputs[0] * keep

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- hooks -----------------------------------------------------------------------------------

    def _expand_broadcast_input(self, module, inputs):
        if not self.armed or self._replay is not None or not torch.is_tensor(inputs[0]):
            return None
        ids = inputs[0]
        if ids.dim() >= 1 and ids.shape[0] == 1 and self.batch_size > 1:
            return (ids.expand(self.batch_size, *ids.shape[1:]),) + tuple(inputs[1:])
        return None

    def _make_forward_hook(self, compute):
        needs_masks = getattr(compute, "needs_dropout_masks", False)

        def forward_hook(module, args, kwargs, output):
            if not self.armed or self._replay is not None or not torch.is_grad_enabled():
                return None
            if not torch.is_tensor(output) or not output.requires_grad:
                if torch.is_tensor(output):
                    return None
                raise UnsupportedModelError(
                    f"{type(module).__name__} returns {type(output).__name__}, not a tensor; per-sample "
                    "gradients of its own parameters cannot be hooked. Move its parameters into a "
                    "submodule that returns a tensor (e.g. an nn.Linear)."
                )
            if needs_masks:
                masks = {m: stack.pop() for m, stack in self._masks.items() if stack}
                self._masks.clear()
                detach = lambda a: a.detach() if torch.is_tensor(a) else a  # noqa: E731
                saved = (tuple(detach(a) for a in args), {k: detach(a) for k, a in kwargs.items()}, masks)
            else:
                saved = [a.detach() if torch.is_tensor(a) else a for a in args]
            output.register_hook(lambda g: self._on_backprop(module, compute, saved, g))
            return None

        return forward_hook

    def _on_backprop(self, module, compute, saved, backprops):
        began = time.perf_counter()
        try:
            self._gather(module, compute, saved, backprops)
        finally:
            self.seconds += time.perf_counter() - began

    def _gather(self, module, compute, saved, backprops):
        if backprops.shape[0] != self.batch_size:
            raise UnsupportedModelError(
                f"{type(module).__name__} sees a batch of {backprops.shape[0]} but the microbatch "
                f"holds {self.batch_size} samples: the layer mixes or broadcasts across the batch, "
                "so its per-sample gradients are not defined. Keep the batch as dimension 0."
            )
        grads = compute(module, saved, backprops.detach())
        if isinstance(module, nn.Embedding) and module.padding_idx is not None and module.weight in grads:
            grads[module.weight][:, module.padding_idx] = 0
        for param, sample_grads in grads.items():
            if id(param) in self._select:
                rows, cols, local = self._select[id(param)]
                flat = sample_grads.reshape(self.batch_size, -1).to(torch.float32)
                self.values[rows, cols] += flat[rows, local]
        return None

    # -- per microbatch --------------------------------------------------------------------------

    def begin(self, positions: torch.Tensor) -> None:
        self.batch_size, k = positions.shape
        if self.pool is None:
            self.values = torch.zeros(self.batch_size, k, dtype=torch.float32, device=positions.device)
        else:
            self.values = self.pool.take((self.batch_size, k), torch.float32, positions.device).zero_()
        self._select.clear()
        self._rows.clear()
        for key, (offset, numel) in self.slot.items():
            if key in self._row_rules:  # the tensor's kept positions are whole rows, in order
                column, kept, cols = self.row_slot[key]
                self._rows[key] = ((positions[:, column : column + kept * cols : cols] - offset) // cols).long()
                continue
            if key in self.row_slot:  # a fixed range of columns in every sample
                column, kept, row_length = self.row_slot[key]
                width = kept * row_length
                samples, columns = self._fixed_columns(key, column, width, positions.device)
                self._select[key] = (samples, columns, (positions[:, column : column + width] - offset).reshape(-1))
                continue
            inside = (positions >= offset) & (positions < offset + numel)
            rows, cols = inside.nonzero(as_tuple=True)
            self._select[key] = (rows, cols, positions[rows, cols] - offset)
        self._masks.clear()
        self.armed = True

    def _fixed_columns(self, key, column, width, device):
        """(sample, column) index pairs of a fixed column range, reused while the batch size holds."""
        cached = self._columns.get(key)
        if cached is None or cached[0] != self.batch_size:
            rows = torch.arange(self.batch_size, device=device).repeat_interleave(width)
            cols = torch.arange(column, column + width, device=device).repeat(self.batch_size)
            cached = self._columns[key] = (self.batch_size, rows, cols)
        return cached[1], cached[2]

    def end(self) -> torch.Tensor:
        self.armed = False
        values, self.values = self.values, None
        self._masks.clear()
        return values

"""The flat layout of a model's trainable parameters: the coordinate system of the store.

Every recorded delta lives in one flat vector of length M, the concatenation of the trainable
parameters in `named_parameters()` order. Frozen parameters are not part of it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_model(cls, model: nn.Module) -> ParamLayout:
        names, shapes = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                names.append(name)
                shapes.append(tuple(param.shape))
        return cls(tuple(names), tuple(shapes))

    @property
    def numels(self) -> list[int]:
        return [int(torch.Size(s).numel()) for s in self.shapes]

    @property
    def offsets(self) -> list[int]:
        out, total = [], 0
        for n in self.numels:
            out.append(total)
            total += n
        return out

    @property
    def num_params(self) -> int:
        return sum(self.numels)

    def fingerprint(self) -> str:
        text = json.dumps([[n, list(s)] for n, s in zip(self.names, self.shapes)])
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def to_json(self) -> list:
        return [[n, list(s)] for n, s in zip(self.names, self.shapes)]

    @classmethod
    def from_json(cls, data: list) -> ParamLayout:
        return cls(tuple(n for n, _ in data), tuple(tuple(s) for _, s in data))

    def params_of(self, model: nn.Module) -> list[nn.Parameter]:
        """The model's trainable parameters in layout order (raises if the model differs)."""
        found = dict(model.named_parameters())
        params = []
        for name, shape in zip(self.names, self.shapes):
            if name not in found or tuple(found[name].shape) != shape:
                raise KeyError(name)
            params.append(found[name])
        return params

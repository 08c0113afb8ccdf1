"""Exact attribution of Adam/AdamW updates to individual samples (pure math, no transformers).

With PyTorch's AdamW (decoupled decay `lam`; `lam = 0` is Adam without L2):

    m_t = b1 m_{t-1} + (1-b1) g_t,   v_t = b2 v_{t-1} + (1-b2) g_t^2
    a_t = lr_t / (1 - b1^t),          D_t = 1 / (sqrt(v_t / (1 - b2^t)) + eps)
    theta_t = theta_{t-1} (1 - lr_t lam) - a_t D_t m_t

Unrolling gives `theta_T - Q_T theta_0 = sum_s sum_i Delta_{s,i}` with

    Delta_{s,i} = -(1-b1) Q_T [ sum_{t>=s} b1^(t-s) x_t ] contrib_{s,i},   x_t = a_t D_t / Q_t

where `Q_t = prod_{u<=t} (1 - lr_u lam)` and `contrib_{s,i}` is sample i's share of the gradient
the optimizer consumed at step s. The bracket needs the future, so each step's contributions stay
"open" until `b1^(t-s)` falls below `tail_tolerance`. The bracket is read off a dense prefix sum
(the ledger) `L_t = sum_{u<=t} b1^(u-e) x_u` kept in float64 and re-based to `e` regularly:

    sum_{t=s..T} b1^(t-s) x_t = b1^(e-s) (L_T - L_{s-1}).

Stored deltas omit the factor `Q_T`; `forget` multiplies by the current `Q`.
With a memory budget smaller than the open tails need (`max_open` < window), a step is closed
after `L = max_open` steps and the rest of its bracket is estimated with its denominator frozen at
closing (bounded tails): `sum_{t>c} b1^(t-s) x_t ~ b1^(c-s) R_c x_c`, `R_c` from the planned
learning rates (`rest_factor`); the recorder passes `R_c x_c` as `x_rest`.

See docs/method.md for the derivation and docs/limits.md for the memory bound of the open tails.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

# Re-base the ledger once the newest term's weight b1^(t-e) has fallen this far, so that the
# difference L_T - L_{s-1} never loses more than ~4 digits to cancellation in float64.
REBASE_WEIGHT = 1e-4


@dataclass
class OpenStep:
    """The contributions of one optimizer step whose momentum tail is still open."""

    step: int
    ids: np.ndarray  # [n] int64 dataset ids
    positions: torch.Tensor  # [n, K] flat positions (int32 when M < 2**31; a broadcast view when K = M)
    contrib: torch.Tensor  # [n, K] float32, contrib_{s,i} at the kept positions
    # L_{s-1} in the current base: at the kept positions [n, K], or the dense [M] ledger when
    # that is smaller (n * K >= M, e.g. keep_fraction = 1).
    start: torch.Tensor


class BufferPool:
    """Buffers of closed momentum tails, handed out again to the steps that open. Each step keeps
    B*K-sized tensors for W steps; on the CPU, fresh ones would fault in new pages every step
    (tens of ms per step for large models). At most `per_shape` buffers wait per shape and dtype."""

    def __init__(self, per_shape: int = 2):
        self.per_shape = per_shape
        self._free: dict[tuple, list[torch.Tensor]] = {}

    def take(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """An uninitialised tensor: a returned buffer of that shape and dtype, or a new one."""
        free = self._free.get((tuple(shape), dtype, torch.device(device)))
        return free.pop() if free else torch.empty(tuple(shape), dtype=dtype, device=device)

    def give(self, tensor: torch.Tensor) -> None:
        """Return a tensor nothing else uses any more (views and broadcasts are not kept)."""
        if tensor.dim() == 0 or not tensor.is_contiguous() or tensor._base is not None:
            return
        free = self._free.setdefault((tuple(tensor.shape), tensor.dtype, tensor.device), [])
        if len(free) < self.per_shape:
            free.append(tensor)


class MomentumLedger:
    """Turns per-step, per-sample gradient contributions into exact per-sample parameter deltas.

    Call `step(...)` once after each optimizer step with the step's contributions and the dense
    `x_t`; it yields `(ids, deltas)` of the steps whose tails have closed. `close_all()` flushes
    the rest at the end of training.
    """

    def __init__(
        self, num_params: int, beta1: float, tail_tolerance: float = 1e-7, device="cpu", max_open: int | None = None
    ):
        if not 0.0 < beta1 < 1.0:
            raise ValueError(f"beta1 must be in (0, 1), got {beta1}")
        if max_open is not None and max_open < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open}")
        self.beta1 = float(beta1)
        self.tail_tolerance = float(tail_tolerance)
        # bounded tails: a step closes after `max_open` steps, the rest of its tail estimated
        self.max_open = max_open if max_open is not None and max_open < self.window else None
        self.ledger = torch.zeros(num_params, dtype=torch.float64, device=device)
        self.base = 1  # step e whose term has weight b1^0
        self.open: deque[OpenStep] = deque()
        self.pool = BufferPool()

    @property
    def window(self) -> int:
        """Steps a contribution stays open: the smallest w with b1^w < tail_tolerance."""
        return max(1, math.ceil(math.log(self.tail_tolerance) / math.log(self.beta1)))

    def step(
        self,
        t: int,
        x_t: torch.Tensor,
        ids: np.ndarray,
        positions: torch.Tensor,
        contrib: torch.Tensor,
        x_rest: torch.Tensor | None = None,
        close_early: bool = True,
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Account optimizer step `t` (1-based, consecutive) and yield the deltas that closed.
        `x_rest` (bounded tails only, dense like `x_t`): `R_t x_t`, the estimated rest of the tails
        that close at this step; without it their rest is left out. `close_early=False` keeps the
        tails that reached `max_open` steps open for this step."""
        if len(ids):
            if positions.numel() >= self.ledger.numel():
                start = self.pool.take(self.ledger.shape, torch.float64, self.ledger.device).copy_(self.ledger)
            else:
                start = _gather(
                    self.ledger, positions, out=self.pool.take(positions.shape, torch.float64, positions.device)
                )
            if positions.stride(0) != 0 and self.ledger.numel() < 2**31:
                positions = positions.to(torch.int32)  # half the memory of the open tails' positions
            self.open.append(OpenStep(t, ids, positions, contrib.float(), start))
        _add_into(self.ledger, x_t, self.beta1 ** (t - self.base))
        while self.open and self.beta1 ** (t + 1 - self.open[0].step) < self.tail_tolerance:
            yield self._close(self.open.popleft())
        while close_early and self.max_open is not None and self.open and t + 1 - self.open[0].step >= self.max_open:
            yield self._close(self.open.popleft(), x_rest, self.beta1 ** (t - self.base))
        if self.beta1 ** (t - self.base) < REBASE_WEIGHT:
            self._rebase(t + 1)

    def close_all(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        while self.open:
            yield self._close(self.open.popleft())

    def _close(self, item: OpenStep, x_rest=None, rest_weight: float = 0.0) -> tuple[np.ndarray, torch.Tensor]:
        start = _gather(item.start, item.positions) if item.start.dim() == 1 else item.start
        tail = _gather(self.ledger, item.positions).sub_(start)  # float64: the difference cancels digits
        if x_rest is not None:  # b1^(t-e) R_t x_t in the ledger's base
            tail.add_(_gather(x_rest, item.positions).to(tail.dtype), alpha=rest_weight)
        coef = -(1.0 - self.beta1) * self.beta1 ** (self.base - item.step)
        deltas = tail.float().mul_(coef).mul_(item.contrib)
        for done in (item.contrib, item.start, item.positions):
            self.pool.give(done)
        return item.ids, deltas

    def _rebase(self, new_base: int) -> None:
        factor = self.beta1 ** (self.base - new_base)
        for item in self.open:
            now = self.ledger if item.start.dim() == 1 else _gather(self.ledger, item.positions)
            item.start.sub_(now).mul_(factor)  # in place: no new memory for every open tail at once
        self.ledger.zero_()
        self.base = new_base

    # -- checkpointing ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {
            "ledger": self.ledger.cpu(),
            "base": torch.tensor(self.base),
            "beta1": torch.tensor(self.beta1, dtype=torch.float64),
            "num_open": torch.tensor(len(self.open)),
        }
        for k, item in enumerate(self.open):
            state[f"open.{k}.step"] = torch.tensor(item.step)
            state[f"open.{k}.ids"] = torch.from_numpy(np.asarray(item.ids, dtype=np.int64))
            state[f"open.{k}.positions"] = item.positions.cpu().contiguous()
            state[f"open.{k}.contrib"] = item.contrib.cpu()
            state[f"open.{k}.start"] = item.start.cpu()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.ledger.device
        self.ledger = state["ledger"].to(device=device, dtype=torch.float64).clone()
        self.base = int(state["base"])
        self.open.clear()
        for k in range(int(state["num_open"])):
            self.open.append(
                OpenStep(
                    step=int(state[f"open.{k}.step"]),
                    ids=state[f"open.{k}.ids"].numpy().copy(),
                    positions=state[f"open.{k}.positions"].to(device),
                    contrib=state[f"open.{k}.contrib"].to(device),
                    start=state[f"open.{k}.start"].to(device).clone(),  # re-based in place later
                )
            )

    def open_bytes(self) -> int:
        """Bytes held by the open tails now (at most `open_tail_bound`)."""
        return sum(_stored_bytes(i.positions) + _stored_bytes(i.contrib) + _stored_bytes(i.start) for i in self.open)


def _stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; none for a broadcast view (the positions when K = M)."""
    return 0 if tensor.dim() and tensor.stride(0) == 0 else tensor.numel() * tensor.element_size()


def rest_factor(beta1: float, step: int, lr_now: float, lrs_ahead, weight_decay: float = 0.0) -> float:
    """`R_t = sum_k b1^k (lr_{t+k} / lr_t) (1 - b1^t) / (1 - b1^(t+k)) prod_{u=t+1..t+k} 1 / (1 - lr_u lam)`
    over k = 1..len(lrs_ahead): the rest of a momentum tail closed at step `t`, in units of `x_t`,
    with the Adam denominator frozen at step t and the learning rates `lrs_ahead` (lr_{t+1}, ...)
    of the planned schedule. 0 when `lr_now` is 0 (then x_t is 0 too)."""
    if lr_now <= 0.0:
        return 0.0
    total, decay, power = 0.0, 1.0, 1.0
    for k, lr in enumerate(lrs_ahead, start=1):
        power *= beta1
        decay *= 1.0 - float(lr) * weight_decay
        total += power * (float(lr) / lr_now) * (1.0 - beta1**step) / (1.0 - beta1 ** (step + k)) / decay
    return total


def bounded_steps(budget_bytes: float, samples_per_step: int, k: int, num_params: int, window: int) -> int | None:
    """How many steps the open tails may hold within `budget_bytes` (at least 1), or None when the
    whole window fits (exact tails)."""
    per_step = open_tail_bound(1, samples_per_step, k, num_params)
    steps = int(budget_bytes // per_step) if per_step else window
    return None if steps >= window else max(1, steps)


def open_tail_bound(window: int, samples_per_step: int, k: int, num_params: int) -> int:
    """The most bytes the open tails hold: `window` steps (`MomentumLedger.window`; while a step is
    accounted, before the oldest closes) of `samples_per_step` samples. Each step keeps its int32
    positions (int64 from 2**31 entries; none when K = M), float32 contributions and the float64
    ledger values where they start: gathered, or one dense copy of the ledger when that is smaller."""
    entries = samples_per_step * k
    positions = 0 if k >= num_params else entries * (4 if num_params < 2**31 else 8)
    return window * (positions + 4 * entries + 8 * min(entries, num_params))


ADD_CHUNK = 1 << 20


def _add_into(ledger: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    """`ledger += alpha * x` for a float64 ledger and a float32 `x`. One mixed-dtype `add_` takes
    a slow path on the CPU (several times slower at millions of entries; docs/performance.md), so
    `x` is converted a chunk at a time: the same values, no second ledger-sized buffer."""
    if x.dtype == ledger.dtype:
        ledger.add_(x, alpha=alpha)
        return
    for lo in range(0, ledger.numel(), ADD_CHUNK):
        ledger[lo : lo + ADD_CHUNK].add_(x[lo : lo + ADD_CHUNK].to(ledger.dtype), alpha=alpha)


def _gather(vector: torch.Tensor, positions: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`vector[positions]` for [n, K] positions, through `index_select` on the flat positions: the
    same values, several times faster than advanced indexing with int32 positions on the CPU.
    `out`, if given, is a contiguous [n, K] tensor of the vector's dtype that receives them."""
    if positions.stride(0) == 0:  # a broadcast view: every sample keeps the same positions
        row = vector.index_select(0, positions[0])
        return row.expand(positions.shape).contiguous() if out is None else out.copy_(row.expand(positions.shape))
    if out is None:
        return vector.index_select(0, positions.reshape(-1)).view(positions.shape)
    torch.index_select(vector, 0, positions.reshape(-1), out=out.view(-1))
    return out


def adam_step_weights(
    params: list[torch.Tensor],
    states: list[dict],
    hyper: list[dict],
    decay: torch.Tensor,
    out: torch.Tensor | None = None,
    steps: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x_t = a_t D_t / Q_t` for every trainable entry, right after an optimizer step.

    `states[j]` is the optimizer state of parameter j (`step`, `exp_avg_sq`), `hyper[j]` its
    param group (`lr`, `betas`, `eps`, `weight_decay`). `decay` holds `Q_{t-1}` per parameter
    tensor (on the CPU) and is returned updated to `Q_t`; `x_t` lies on the parameters' device,
    where the ledger is. A parameter without state this step (no gradient) gets x = 0 and no
    decay, as the optimizer skipped it. `out`, when given and of the right size and type,
    receives `x_t` (a buffer reused every step: no fresh memory to fault in). `steps`, when given,
    holds each parameter's step count already read (no read of a device tensor per parameter).
    """
    # In the optimizer's own precision (at least float32): D_t is what the step used.
    wide = any("exp_avg_sq" in s and s["exp_avg_sq"].dtype == torch.float64 for s in states)
    dtype, size = (torch.float64 if wide else torch.float32), sum(p.numel() for p in params)
    device = params[0].device if params else decay.device  # the ledger's: x_t never leaves it
    if out is None or out.dtype != dtype or out.numel() != size or out.device != device:
        out = torch.empty(size, dtype=dtype, device=device)
    new_decay = decay.tolist()  # Python floats: no tensor op per parameter for a scalar
    offset = 0
    for j, (param, state, group) in enumerate(zip(params, states, hyper)):
        piece = out[offset : offset + param.numel()]
        offset += param.numel()
        if "exp_avg_sq" not in state:
            piece.zero_()
            continue
        t = float(state["step"]) if steps is None else steps[j]
        beta1, beta2 = group["betas"]
        lr = float(group["lr"])
        new_decay[j] *= 1.0 - lr * group["weight_decay"]
        # a_t D_t / Q_t with D_t = 1 / (sqrt(v_t) / c + eps), c = sqrt(1 - b2^t), computed as
        # (a_t c / Q_t) / (sqrt(v_t) + eps c): four passes over the entries instead of five.
        c = math.sqrt(1.0 - beta2**t)
        v = state["exp_avg_sq"].detach().reshape(-1).to(device=device)
        torch.sqrt(v, out=piece).add_(group["eps"] * c).reciprocal_().mul_(lr / (1.0 - beta1**t) * c / new_decay[j])
    return out, torch.tensor(new_decay, dtype=decay.dtype, device=decay.device)

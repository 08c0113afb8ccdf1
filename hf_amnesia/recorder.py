"""Recording during training: per-sample gradients -> exact per-sample deltas -> the store.

The `Recorder` is driven by `AmnesiacTrainer` (it knows nothing of `transformers`):

    begin_microbatch(ids)   before the forward pass of a microbatch
    end_microbatch(scale)   after its backward pass (scale: the loss scale of mixed precision)
    set_clip_coef(c)        when the gradient is clipped before the optimizer step
    (optimizer step)        a post-step hook turns the step's contributions into open tails
    close_tails()           end of training: closes every open tail and appends it to the log
    compact()               folds the shard's log into its rows (the run's commit for the shard)
    close()                 removes the hooks and closes the log

Closed deltas go to the shard's log at every step, or, with `sum_ids`, into per-id sums in memory
(`DeltaSums`) that are written to the log at checkpoints and at the end.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .attribution import MomentumLedger, adam_step_weights, bounded_steps, rest_factor
from .errors import UnsupportedOptimizerError, UnsupportedTrainingError
from .per_sample import PerSampleCapture
from .store import Manifest, ShardWriter, manifest_positions, row_plan, row_positions, row_positions_torch

logger = logging.getLogger(__name__)


class Recorder:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        store_dir: str | Path,
        manifest: Manifest,
        rank: int = 0,
        world_size: int = 1,
        tail_tolerance: float = 1e-7,
        sum_ids: np.ndarray | None = None,
        tail_budget_bytes: float | None = None,
        samples_per_step: int = 1,
    ):
        self.manifest = manifest
        self.layout = manifest.layout
        self.params = self.layout.params_of(model)
        self.k = manifest.k
        self.rank, self.world_size = rank, world_size
        beta1s = {float(g["betas"][0]) for g in optimizer.param_groups}
        if len(beta1s) != 1:
            raise UnsupportedOptimizerError(
                f"param groups use different beta1 values {sorted(beta1s)}; use one beta1 for all groups."
            )
        device = self.params[0].device
        beta1, k, num_params = beta1s.pop(), manifest.k, self.layout.num_params
        window = MomentumLedger(1, beta1, tail_tolerance, "meta").window
        bound = (
            None
            if tail_budget_bytes is None
            else bounded_steps(tail_budget_bytes, samples_per_step, k, num_params, window)
        )
        self.ledger = MomentumLedger(num_params, beta1, tail_tolerance, device, max_open=bound)
        self._schedule, self._total_steps, self._x_rest = None, None, None
        self.bounded_steps: int | None = None  # the fewest steps a tail stayed open before its rest was estimated
        # sum_ids: every id this process may train on; their closed deltas are summed in memory
        # (made before any hook or file is opened: nothing to undo if it does not fit)
        self.sums = None if sum_ids is None else DeltaSums(sum_ids, self.k, device)
        self.decay = torch.tensor(manifest.decay or [1.0] * len(self.params), dtype=torch.float64)
        plan = row_plan(manifest.keep_fraction, self.layout.shapes) if manifest.keep_layout == "rows" else None
        self.capture = PerSampleCapture(model, self.params, row_plan=plan)
        self.capture.pool = self.ledger.pool  # value buffers come back when their tails close
        self.shard = ShardWriter(Path(store_dir), rank, self.k, manifest.dtype)
        self.optimizer = optimizer
        self._hook = optimizer.register_step_post_hook(self._after_step)
        self._pending: list[tuple[np.ndarray, torch.Tensor, torch.Tensor]] = []
        self._ids: np.ndarray | None = None
        self._positions: torch.Tensor | None = None
        self.clip_coef = 1.0
        self._x_t: torch.Tensor | None = None
        self.steps = 0
        self._last_counts = self._step_counts()
        self.record_seconds = 0.0

    # -- driven by the trainer -------------------------------------------------------------------

    def begin_microbatch(self, ids: np.ndarray) -> None:
        began = time.perf_counter()
        self._ids = np.asarray(ids, dtype=np.int64)
        if self.sums is not None:
            self.sums.check(self._ids)  # before training on them, not when their tails close
        self._positions = self._positions_of(self._ids)
        self.capture.begin(self._positions)
        self.record_seconds += time.perf_counter() - began

    def _positions_of(self, ids: np.ndarray) -> torch.Tensor:
        device = self.params[0].device
        if self.k == self.layout.num_params:  # everything kept: a broadcast view, no [n, M] copy
            return torch.arange(self.k, device=device).expand(len(ids), self.k)
        small = self.layout.num_params < 2**31  # int32 positions: half the bytes to build, keep and gather
        manifest = self.manifest
        if manifest.keep_layout != "rows":
            return torch.from_numpy(manifest_positions(manifest, ids, np.int32 if small else np.int64)).to(device)
        # into a closed tail's buffer, as the open tail keeps them; hashed where the model trains
        on_device = _hashes_on_device(device)
        out = self.ledger.pool.take(
            (len(ids), self.k), torch.int32 if small else torch.int64, device if on_device else "cpu"
        )
        shapes, keep_fraction = manifest.layout.shapes, manifest.keep_fraction
        if on_device:
            return row_positions_torch(manifest.seed, ids, shapes, keep_fraction, out.dtype, device, out=out)
        row_positions(manifest.seed, ids, shapes, keep_fraction, out=out.numpy())
        return out.to(device)

    def end_microbatch(self, loss_scale: float = 1.0) -> None:
        values = self.capture.end()
        if loss_scale != 1.0:
            values = values / loss_scale
        self._pending.append((self._ids, self._positions, values))
        self._ids = self._positions = None

    def set_clip_coef(self, total_norm: float, max_norm: float) -> None:
        """The coefficient `torch.nn.utils.clip_grad_norm_` applied to the gradient."""
        self.clip_coef = min(1.0, float(max_norm) / (float(total_norm) + 1e-6))

    def _step_counts(self) -> list[float]:
        """Each parameter's optimizer step count, read from the device in one transfer (a fused or
        capturable AdamW keeps them on the GPU: one read per tensor would wait on it every time)."""
        steps = [self.optimizer.state[p].get("step") for p in self.params]
        tensors = [s for s in steps if isinstance(s, torch.Tensor)]
        if tensors and len({t.device for t in tensors}) == 1:
            read = iter(torch.stack([t.reshape(()) for t in tensors]).tolist())
            return [0.0 if s is None else float(next(read)) if isinstance(s, torch.Tensor) else float(s) for s in steps]
        return [0.0 if s is None else float(s) for s in steps]

    def _after_step(self, optimizer, args, kwargs) -> None:
        began = time.perf_counter()
        counts = self._step_counts()
        took = [c > last for c, last in zip(counts, self._last_counts)]
        self._last_counts = counts
        pending, self._pending = self._pending, []
        coef, self.clip_coef = self.clip_coef, 1.0
        if not any(took):  # the optimizer skipped this step (e.g. fp16 overflow): nothing happened
            return
        states = [optimizer.state[p] if stepped else {} for p, stepped in zip(self.params, took)]
        # Look groups up at every step: `load_state_dict` (Accelerate, resuming) replaces the dicts.
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        hyper = [group_of[id(p)] for p in self.params]
        x_t, self.decay = adam_step_weights(self.params, states, hyper, self.decay, out=self._x_t, steps=counts)
        self._x_t = x_t  # the ledger reads it at once: the next step reuses the buffer
        if len(pending) == 1:  # one microbatch: its own buffers become the open tail, no copy
            ids, positions, contrib = pending[0]
            contrib.mul_(coef / self.world_size)
        elif pending:
            ids = np.concatenate([ids for ids, _, _ in pending])
            if self.k == self.layout.num_params:
                positions = self._positions_of(ids)  # a broadcast view
            else:
                positions = torch.cat([pos for _, pos, _ in pending])
            contrib = torch.cat([vals for _, _, vals in pending]).mul_(coef / self.world_size)
        else:
            ids = np.zeros(0, dtype=np.int64)
            positions = contrib = None
        self.steps += 1
        x_rest, close_early = self._bounded_close(x_t, states, hyper)
        for closed_ids, deltas in self.ledger.step(self.steps, x_t, ids, positions, contrib, x_rest, close_early):
            self._closed(closed_ids, deltas)
        self.record_seconds += time.perf_counter() - began

    def _bounded_close(self, x_t, states, hyper) -> tuple[torch.Tensor | None, bool]:
        """Bounded tails: `(x_rest, close_early)` for this step. The tails that reach `max_open`
        steps close with their rest estimated, unless a learning rate of this step is 0 (warmup's
        first step: `x_t` is 0 there and could not carry the rest), when they stay open until a step
        whose rates are above 0; with no training steps left, nothing remains to estimate."""
        max_open = self.ledger.max_open
        if not max_open or self.steps < max_open:
            return None, True
        horizon = self.ledger.window - max_open
        if self._total_steps is not None:
            horizon = max(0, min(horizon, self._total_steps - self.steps))
        if horizon == 0:
            return None, True
        if any(float(group["lr"]) <= 0.0 for group, state in zip(hyper, states) if "step" in state):
            return None, False
        self.bounded_steps = max_open if self.bounded_steps is None else min(self.bounded_steps, max_open)
        return self._rest_of(x_t, states, hyper, horizon), True

    def plan_schedule(self, scheduler, total_steps: int) -> None:
        """The learning rates planned for the steps ahead (bounded tails estimate the rest of a tail
        from them): those of a `LambdaLR` (what `transformers.get_scheduler` makes) and the run's
        total steps; with another scheduler, the current rates are taken to stay."""
        self._total_steps = int(total_steps)
        lambdas, bases = getattr(scheduler, "lr_lambdas", None), getattr(scheduler, "base_lrs", None)
        if lambdas is not None and bases is not None and len(lambdas) == len(bases):
            self._schedule = lambda step: [base * f(step - 1) for base, f in zip(bases, lambdas)]

    def _rest_of(self, x_t: torch.Tensor, states: list[dict], hyper: list[dict], horizon: int) -> torch.Tensor:
        """`R_t x_t` per parameter tensor (`attribution.rest_factor`): the rest of the tails that
        close at this step, over the `horizon` steps their exact window (and training) has left."""
        groups = self.optimizer.param_groups
        index = {id(group): g for g, group in enumerate(groups)}
        ahead = [self._schedule(u) for u in range(self.steps + 1, self.steps + 1 + horizon)] if self._schedule else None
        if self._x_rest is None or self._x_rest.shape != x_t.shape or self._x_rest.dtype != x_t.dtype:
            self._x_rest = torch.empty_like(x_t)
        factors, offset = {}, 0
        for j, (param, state, group) in enumerate(zip(self.params, states, hyper)):
            piece = slice(offset, offset + param.numel())
            offset += param.numel()
            if "step" not in state:
                self._x_rest[piece] = 0.0
                continue
            g, step, lr = index[id(group)], int(self._last_counts[j]), float(group["lr"])
            if (g, step) not in factors:
                lrs = [rates[g] for rates in ahead] if ahead is not None else [lr] * horizon
                factors[g, step] = rest_factor(self.ledger.beta1, step, lr, lrs, float(group["weight_decay"]))
            torch.mul(x_t[piece], factors[g, step], out=self._x_rest[piece])
        return self._x_rest

    def _closed(self, ids: np.ndarray, deltas: torch.Tensor) -> None:
        if self.sums is None:
            self.shard.append(ids, deltas)
        else:
            self.sums.add(ids, deltas)

    def _write_sums(self) -> None:
        """Append the in-memory sums to the log (one record per id touched since the last write)."""
        if self.sums is not None:
            for ids, values in self.sums.drain():
                self.shard.append(ids, values)

    def close_tails(self) -> None:
        """End of training: every open tail is complete; append the deltas to the log."""
        if self.bounded_steps is not None and self._total_steps is not None and self.steps < self._total_steps:
            logger.warning(
                "hf_amnesia: training stopped at step %d of the %d planned: the momentum tails closed early in "
                "its last steps were estimated with steps that did not run, so their deltas are too large "
                "(docs/limits.md, Bounded tails). A larger tail_memory_budget_mb keeps them exact.",
                self.steps,
                self._total_steps,
            )
        for closed_ids, deltas in self.ledger.close_all():
            self._closed(closed_ids, deltas)
        self._write_sums()
        self.shard.log_size()  # durable

    def compact(self) -> None:
        """Fold this process's log into its rows (the run's commit point for this shard)."""
        self.shard.compact()

    def close(self, after_error: bool = False) -> None:
        """Remove the hooks and close the shard's log. `after_error`: training stopped on an error
        (a full disk, say), which closing the log (flushing it) may raise again; that second error
        is logged, so that the first one is what the caller sees."""
        self._hook.remove()
        self.capture.remove()
        try:
            self.shard.close()
        except OSError as err:
            if not after_error:
                raise
            logger.warning("hf_amnesia: closing the store's log after the error below failed too: %s", err)

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._write_sums()  # the checkpoint's log position covers every delta closed so far
        state = {f"ledger.{k}": v for k, v in self.ledger.state_dict().items()}
        state["decay"] = self.decay.clone()
        state["steps"] = torch.tensor(self.steps)
        state["bounded_steps"] = torch.tensor(-1 if self.bounded_steps is None else self.bounded_steps)
        state["log_size"] = torch.tensor(self.shard.log_size())
        state["generation"] = torch.tensor(self.shard.state.generation)
        state["log_consumed"] = torch.tensor(self.shard.state.log_consumed)
        # Which store, run and forget requests the checkpoint belongs to (`recording.check_resume`)
        state["store_id"] = _text_tensor(self.manifest.store_id)
        state["run_id"] = _text_tensor(self.manifest.run_id)
        state["commits"] = torch.tensor(self.manifest.commits)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ledger.load_state_dict({k[len("ledger.") :]: v for k, v in state.items() if k.startswith("ledger.")})
        self.decay = state["decay"].to(torch.float64).clone()
        self.steps = int(state["steps"])
        saved = int(state["bounded_steps"]) if "bounded_steps" in state else -1
        if saved > 0:  # tails of the run before the checkpoint were estimated: the store says so at the end
            self.bounded_steps = saved if self.bounded_steps is None else min(saved, self.bounded_steps)
        self.shard.resume(int(state["log_size"]), int(state["generation"]), int(state["log_consumed"]))
        self._last_counts = self._step_counts()


def _text_tensor(text: str | None) -> torch.Tensor:
    """A string as a uint8 tensor (safetensors holds tensors); None is empty."""
    return torch.tensor(list((text or "").encode()), dtype=torch.uint8)


def _hashes_on_device(device: torch.device) -> bool:
    """The `rows` layout's positions are hashed where the model trains (no host work, no copy),
    except on the CPU, where the host's numpy hashing is faster."""
    return device.type != "cpu"


class DeltaSums:
    """Per-id sums of closed deltas, kept where the model trains until they are written to the log.

    The log is summed per id when it is folded into rows, so writing one record per id now and
    then (at checkpoints, at the end) stores the same sums as one record per id and step, without
    copying and writing `B*K` values at every step. Costs `len(ids) * K * 4` bytes, plus at most
    `chunk_bytes` while they are written.
    """

    def __init__(self, ids: np.ndarray, k: int, device, chunk_bytes: int = 64 * 2**20):
        self.ids = np.unique(np.asarray(ids, dtype=np.int64))
        self.chunk_rows = max(1, chunk_bytes // (4 * k))
        try:
            self.values = torch.zeros(len(self.ids), k, dtype=torch.float32, device=device)
        except (torch.OutOfMemoryError, RuntimeError) as err:  # the CPU allocator raises RuntimeError
            raise UnsupportedTrainingError(
                f"sum_deltas_in_memory needs {len(self.ids) * k * 4 / 2**30:.2f} GiB on {device} for "
                f"{len(self.ids)} rows of {k} values, which is not free: set sum_deltas_in_memory=False."
            ) from err
        self.touched = torch.zeros(len(self.ids), dtype=torch.bool, device=device)

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        rows = np.searchsorted(self.ids, ids)
        if len(ids) and (rows.max() >= len(self.ids) or not np.array_equal(self.ids[rows], ids)):
            raise UnsupportedTrainingError(
                "a training batch holds an id that is not among train_dataset's ids; with "
                "sum_deltas_in_memory (on by default for a datasets.Dataset whose sums fit 1 GiB) every "
                "training row must come from train_dataset. Set sum_deltas_in_memory=False to train on others."
            )
        return rows

    def check(self, ids: np.ndarray) -> None:
        """Raise before training on an id that has no row here."""
        self._rows(ids)

    def add(self, ids: np.ndarray, deltas: torch.Tensor) -> None:
        rows = torch.from_numpy(self._rows(ids)).to(self.values.device)
        self.values.index_add_(0, rows, deltas.float())
        self.touched[rows] = True

    def drain(self):
        """Yield (ids, values) of the touched rows, chunk by chunk, and zero them."""
        rows = torch.nonzero(self.touched).flatten()
        for lo in range(0, len(rows), self.chunk_rows):
            chunk = rows[lo : lo + self.chunk_rows]
            yield self.ids[chunk.cpu().numpy()], self.values[chunk]
            self.values[chunk] = 0.0
        self.touched.zero_()

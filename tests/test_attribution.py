"""The momentum ledger reproduces torch AdamW exactly (float64), with tails closing and re-basing."""

import numpy as np
import pytest
import torch

from hf_amnesia.attribution import MomentumLedger, adam_step_weights, bounded_steps, open_tail_bound, rest_factor


def _replay(
    steps, beta1, tail_tolerance, weight_decay, opt_cls=torch.optim.AdamW, checkpoint_at=None, max_open=None, rest=True
):
    torch.manual_seed(0)
    num, batch = 7, 3
    param = torch.nn.Parameter(torch.randn(num, dtype=torch.float64))
    theta0 = param.detach().clone()
    kwargs = {"weight_decay": weight_decay} if weight_decay else {}
    opt = opt_cls([param], lr=0.05, betas=(beta1, 0.99), **kwargs)
    schedule = lambda s: min(1.0, (s + 1) / 5) * (1 - s / (steps + 1))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    ledger = MomentumLedger(num, beta1, tail_tolerance, max_open=max_open)
    decay = torch.ones(1, dtype=torch.float64)
    per_sample = {}
    positions = torch.arange(num).repeat(batch, 1)
    for t in range(1, steps + 1):
        contrib = torch.randn(batch, num, dtype=torch.float64)
        param.grad = contrib.sum(0).clone()
        opt.step()
        x_t, decay = adam_step_weights([param], [opt.state[param]], [opt.param_groups[0]], decay)
        ids = np.arange(batch) + 10 * (t % 4)  # ids recur: deltas accumulate over "epochs"
        x_rest = None
        if ledger.max_open is not None and rest:  # the planned learning rates of the steps left
            horizon = min(ledger.window - ledger.max_open, steps - t)
            ahead = [0.05 * schedule(u - 1) for u in range(t + 1, t + 1 + horizon)]
            x_rest = x_t * rest_factor(beta1, t, 0.05 * schedule(t - 1), ahead, weight_decay)
        for closed, delta in ledger.step(t, x_t, ids, positions, contrib, x_rest):
            for i, d in zip(closed, delta.double()):
                per_sample[int(i)] = per_sample.get(int(i), 0) + d
        sched.step()
        if checkpoint_at == t:
            state = ledger.state_dict()
            ledger = MomentumLedger(num, beta1, tail_tolerance)
            ledger.load_state_dict(state)
    for closed, delta in ledger.close_all():
        for i, d in zip(closed, delta.double()):
            per_sample[int(i)] = per_sample.get(int(i), 0) + d
    total = decay[0] * sum(per_sample.values())
    change = param.detach() - decay[0] * theta0
    return float((total - change).norm() / change.norm()), ledger


@pytest.mark.parametrize("beta1", [0.5, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sum_of_deltas_is_the_training_change(beta1, weight_decay):
    # 300 steps: tails close long before the end and the ledger re-bases many times.
    err, _ = _replay(300, beta1, 1e-12, weight_decay)
    assert err <= 1e-6


def test_checkpointed_ledger_continues_exactly():
    err, _ = _replay(120, 0.9, 1e-12, 0.1, checkpoint_at=57)
    assert err <= 1e-6


def test_adam_without_decay_is_the_same_split():
    err, _ = _replay(60, 0.9, 1e-12, 0.0, opt_cls=torch.optim.Adam)
    assert err <= 1e-6


def test_open_tails_stay_bounded_by_the_window():
    _, ledger = _replay(300, 0.9, 1e-7, 0.0)
    assert ledger.window == 153  # ceil(log(1e-7) / log(0.9))
    assert len(ledger.open) <= ledger.window


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_bounded_tails_estimate_the_rest_of_each_tail(weight_decay):
    # Closed after 8 steps, each tail's rest is estimated with the denominator frozen: the sum of
    # deltas is 20 times closer to the training change than with the rest left out (random
    # gradients: the denominator moves far more from step to step than in training).
    err, ledger = _replay(300, 0.9, 1e-7, weight_decay, max_open=8)
    assert ledger.max_open == 8 and len(ledger.open) < 8
    truncated, _ = _replay(300, 0.9, 1e-7, weight_decay, max_open=8, rest=False)
    assert truncated >= 0.2 and err <= truncated / 20
    longer, _ = _replay(300, 0.9, 1e-7, weight_decay, max_open=32)
    assert longer <= 2e-3


def test_a_budget_that_holds_the_window_keeps_the_tails_exact():
    exact, _ = _replay(120, 0.9, 1e-12, 0.1)
    bounded, ledger = _replay(120, 0.9, 1e-12, 0.1, max_open=10_000)
    assert ledger.max_open is None and bounded == exact
    one_step = open_tail_bound(1, 64, 100, 10_000)
    assert bounded_steps(one_step * 8.5, 64, 100, 10_000, window=153) == 8
    assert bounded_steps(one_step * 153, 64, 100, 10_000, window=153) is None
    assert bounded_steps(1, 64, 100, 10_000, window=153) == 1  # never fewer than one step


def test_tails_kept_open_a_step_longer_close_at_the_next():
    ledger = MomentumLedger(4, 0.9, 1e-7, max_open=2)
    positions = torch.arange(4).repeat(1, 1)
    closed = []
    for t, early in zip(range(1, 5), (True, False, False, True)):
        closed += [
            (t, int(i[0]))
            for i, _ in ledger.step(t, torch.ones(4), np.array([t]), positions, torch.ones(1, 4), None, early)
        ]
    assert closed == [(4, 1), (4, 2), (4, 3)]  # steps 1-3 waited for step 4, which may close early


def test_rest_factor_is_the_geometric_sum_at_a_constant_rate():
    # Constant lr, no decay, late in training (bias correction ~ 1): R = sum_k b1^k
    r = rest_factor(0.9, 10_000, 1e-3, [1e-3] * 50)
    assert r == pytest.approx(sum(0.9**k for k in range(1, 51)), rel=1e-9)
    assert rest_factor(0.9, 5, 0.0, [1e-3] * 5) == 0.0


def test_truncated_tail_error_is_about_the_tolerance():
    err, _ = _replay(300, 0.9, 1e-3, 0.0)
    assert err <= 1e-2


def test_x_t_lies_on_the_parameters_device_and_reuses_its_buffer():
    # The ledger lives on the parameters' device (a GPU in training) while the decay factors stay
    # on the CPU; "meta" stands in for another device on a CPU-only machine.
    params = [torch.nn.Parameter(torch.zeros(3, 2, device="meta")), torch.nn.Parameter(torch.zeros(4, device="meta"))]
    states = [{"step": torch.tensor(3.0), "exp_avg_sq": torch.ones_like(p)} for p in params]
    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    x_t, decay = adam_step_weights(params, states, [group, group], torch.ones(2, dtype=torch.float64))
    assert x_t.device.type == "meta" and x_t.shape == (10,) and x_t.dtype == torch.float32
    assert decay.device.type == "cpu" and torch.allclose(decay, torch.full((2,), 1 - 1e-5, dtype=torch.float64))
    cpu = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]
    cpu_states = [{"step": torch.tensor(3.0), "exp_avg_sq": torch.rand_like(p)} for p in cpu]
    first, _ = adam_step_weights(cpu, cpu_states, [group, group], torch.ones(2, dtype=torch.float64))
    again, _ = adam_step_weights(cpu, cpu_states, [group, group], torch.ones(2, dtype=torch.float64), out=first)
    assert again.data_ptr() == first.data_ptr()  # the buffer is reused, not reallocated


def test_the_ledger_update_in_chunks_equals_one_mixed_dtype_add(monkeypatch):
    from hf_amnesia import attribution

    monkeypatch.setattr(attribution, "ADD_CHUNK", 7)  # several chunks and a ragged last one
    ledger = torch.randn(45, dtype=torch.float64)
    x = torch.randn(45)
    expected = ledger.clone().add_(x, alpha=0.37)
    attribution._add_into(ledger, x, 0.37)
    assert torch.equal(ledger, expected)


@pytest.mark.parametrize("keep_fraction,layout", [(0.3, "rows"), (0.05, "entries"), (1.0, "entries")])
def test_open_tails_reach_exactly_their_stated_bound(tmp_path, caplog, keep_fraction, layout):
    from tiny import TinyCNN, image_dataset, tiny_config
    from transformers import TrainerCallback

    from hf_amnesia import AmnesiacTrainer, StoreReader
    from hf_amnesia.attribution import open_tail_bound

    seen = []

    class OpenBytes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(trainer._recorder.ledger.open_bytes())

    torch.manual_seed(0)
    # beta1 0.5: W = 24 steps; 40 rows in full batches of 4 for 3 epochs: 30 steps
    args = tiny_config(tmp_path, keep_fraction=keep_fraction, keep_layout=layout, adam_beta1=0.5, num_train_epochs=3)
    trainer = AmnesiacTrainer(model=TinyCNN(), args=args, train_dataset=image_dataset(40), callbacks=[OpenBytes()])
    with caplog.at_level("WARNING"):
        trainer.train()
    manifest = StoreReader(args.store_dir).manifest
    one_step = open_tail_bound(1, 4, manifest.k, manifest.num_params)
    # At a step's end the oldest tail has closed: W - 1 steps are open (W while a step is accounted).
    assert len(seen) == 30 and max(seen) == 23 * one_step
    assert open_tail_bound(24, 4, manifest.k, manifest.num_params) == 24 * one_step
    assert f"(24 steps of 4 samples) take up to {24 * one_step / 2**20:.1f} MiB on {trainer.args.device}" in caplog.text


def test_closed_tails_buffers_go_to_the_steps_that_open():
    from hf_amnesia.attribution import BufferPool

    pool = BufferPool(per_shape=1)
    a = torch.zeros(3, 4)
    pool.give(a)
    pool.give(torch.zeros(3, 4))  # over the cap: dropped
    pool.give(torch.zeros(6)[:3])  # a view: never handed out
    assert pool.take((3, 4), torch.float32, "cpu") is a
    assert pool.take((3, 4), torch.float32, "cpu") is not a and pool.take((3,), torch.float32, "cpu").numel() == 3

    # In the ledger, a step that opens after one closed keeps its starts in the closed one's buffer.
    torch.manual_seed(0)
    num, n, k, beta1 = 50, 3, 5, 0.5
    ledger = MomentumLedger(num, beta1, tail_tolerance=1e-3)
    freed = set()
    for t in range(1, 3 * ledger.window):
        positions = torch.stack([torch.randperm(num)[:k] for _ in range(n)]).to(torch.int32)
        closing = ledger.open[0] if len(ledger.open) == ledger.window - 1 else None
        list(ledger.step(t, torch.randn(num), np.arange(n), positions, torch.randn(n, k)))
        if t > ledger.window + 1:
            assert ledger.open[-1].start.data_ptr() in freed
        if closing is not None:
            freed.add(closing.start.data_ptr())

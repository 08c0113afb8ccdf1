"""Train a tiny CNN with recording and checkpoints; can be SIGKILLed and resumed.

    python tests/scripts/crash_train.py OUT [resume]

`KILL_AT_STEP=n` kills the process at the end of optimizer step n; `HF_AMNESIA_CRASH_AT` kills it
at a named point inside hf_amnesia. `SUMS_IN_MEMORY=1` records with `sum_deltas_in_memory` and
tails that close 3 steps after their step (so sums are written at the checkpoints). The final
weights go to OUT/final.safetensors.
"""

import os
import signal
import sys

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from tiny import TinyCNN, image_dataset, tiny_config  # noqa: E402

from hf_amnesia import AmnesiacTrainer  # noqa: E402


class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("KILL_AT_STEP", "-1")):
            os.kill(os.getpid(), signal.SIGKILL)


# sum_deltas_in_memory with tails that close 3 steps after their step (beta1 0.9): deltas closed
# before a checkpoint are summed in memory and written there, while later steps' tails are open
SUMS_IN_MEMORY = {"sum_deltas_in_memory": True, "tail_tolerance": 0.8}


def config(out, **overrides):
    """Checkpoints every 4 steps; tails stay open across checkpoints (tail_tolerance 1e-12, unless
    `overrides` set another)."""
    return tiny_config(
        out,
        keep_fraction=0.3,
        store_dtype="float32",
        num_train_epochs=3,
        learning_rate=1e-2,
        weight_decay=0.05,
        max_grad_norm=1.0,
        save_strategy="steps",
        save_steps=4,
        seed=0,
        **{"tail_tolerance": 1e-12, **overrides},
    )


def main(out: str, resume: bool) -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    args = config(out, **(SUMS_IN_MEMORY if os.environ.get("SUMS_IN_MEMORY") else {"sum_deltas_in_memory": False}))
    trainer = AmnesiacTrainer(model=model, args=args, train_dataset=image_dataset(24), callbacks=[KillAt()])
    trainer.train(resume_from_checkpoint=True if resume else None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "final.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "resume")

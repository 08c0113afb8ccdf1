"""Tiny models and data built in code for the tests (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback


class TinyCNN(nn.Module):
    """A small MNIST-style CNN returning {"loss", "logits"} like an HF model."""

    def __init__(self, channels: int = 4, classes: int = 3, side: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.norm = nn.GroupNorm(2, channels)
        self.head = nn.Linear(channels * (side // 2) ** 2, classes)

    def forward(self, pixel_values, labels=None):
        x = torch.relu(self.norm(self.conv(pixel_values)))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        logits = self.head(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def image_dataset(n: int = 24, side: int = 8, classes: int = 3, seed: int = 0, with_ids: bool = False) -> Dataset:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    images = rng.normal(size=(n, 1, side, side)).astype(np.float32) + labels[:, None, None, None] * 0.5
    data = {"pixel_values": images.tolist(), "labels": labels.tolist()}
    if with_ids:
        data["dataset_id"] = (np.arange(n) * 7 + 100).tolist()
    return Dataset.from_dict(data).with_format("torch")


def tiny_bert(seed: int = 0, classes: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=classes,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    return BertForSequenceClassification(config)


def text_dataset(n: int = 16, seq: int = 10, classes: int = 3, seed: int = 0) -> Dataset:
    """Token ids with padding (id 0) at the end of each row, and an attention mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, seq + 1, size=n)
    input_ids = np.zeros((n, seq), dtype=np.int64)
    mask = np.zeros((n, seq), dtype=np.int64)
    for i, length in enumerate(lengths):
        input_ids[i, :length] = rng.integers(1, 50, size=length)
        mask[i, :length] = 1
    labels = rng.integers(0, classes, size=n)
    data = {"input_ids": input_ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    return Dataset.from_dict(data).with_format("torch")


def tiny_gpt2_lm(seed: int = 0, vocab: int = 40, positions: int = 16):
    """A 2-layer GPT-2 causal LM (hidden 16), no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0, vocab: int = 40, tied: bool = False):
    """A 2-layer Llama-style causal LM (RMSNorm, rotary positions, grouped KV heads), tied or untied
    input and output embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tied, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def lm_dataset(n: int = 12, seq: int = 10, vocab: int = 40, seed: int = 0, with_ids: bool = False) -> Dataset:
    """Token rows of varied length padded with id 0 at the end; `labels` are the input ids with -100
    on the padding (a causal LM shifts them itself)."""
    rng = np.random.default_rng(seed)
    input_ids = np.zeros((n, seq), dtype=np.int64)
    mask = np.zeros((n, seq), dtype=np.int64)
    for i, length in enumerate(rng.integers(3, seq + 1, size=n)):
        input_ids[i, :length] = rng.integers(1, vocab, size=length)
        mask[i, :length] = 1
    labels = np.where(mask == 1, input_ids, -100)
    data = {"input_ids": input_ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    if with_ids:
        data["dataset_id"] = (np.arange(n) * 3 + 1000).tolist()
    return Dataset.from_dict(data).with_format("torch")


def tiny_vit(seed: int = 0, classes: int = 3, dropout: float = 0.0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        num_labels=classes,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def trainer_device() -> str:
    """Where the trainer tests train: "cpu" (default) or "cuda" (HF_AMNESIA_TEST_DEVICE=cuda)."""
    import os

    device = os.environ.get("HF_AMNESIA_TEST_DEVICE", "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"HF_AMNESIA_TEST_DEVICE must be 'cpu' or 'cuda', got {device!r}")
    return device


def tiny_config(out, **overrides):
    """A quiet AmnesiaConfig for tiny test runs; keyword arguments override the defaults. It runs on
    the CPU unless HF_AMNESIA_TEST_DEVICE=cuda (the trainer tests on a GPU machine)."""
    from hf_amnesia import AmnesiaConfig

    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        report_to=[],
        save_strategy="no",
        use_cpu=trainer_device() == "cpu",
        disable_tqdm=True,
        logging_strategy="no",
    )
    return AmnesiaConfig(**{**base, **overrides})


def trained_tiny_cnn(out):
    """A TinyCNN trained with recording on 72 rows of 3 classes (24 more held out as eval_dataset):
    (trainer, train, holdout, trained weights as one CPU vector)."""
    from hf_amnesia import AmnesiacTrainer

    torch.manual_seed(0)
    data = image_dataset(96, classes=3, seed=0, with_ids=True)
    train, holdout = data.select(range(72)), data.select(range(72, 96))
    args = tiny_config(out, keep_fraction=0.2, num_train_epochs=3, learning_rate=1e-2, per_device_train_batch_size=8)
    trainer = AmnesiacTrainer(model=TinyCNN(), args=args, train_dataset=train, eval_dataset=holdout)
    trainer.train()
    theta = torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach().cpu().clone()
    return trainer, train, holdout, theta


def run_two_processes(script: str, *args: str, port: int, timeout: int = 900) -> None:
    """Run `script` in 2 CPU processes with torchrun; fail the test with its stderr if it fails."""
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        script,
        *args,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


class Crash(RuntimeError):
    """A simulated crash inside training."""


class CrashAt(TrainerCallback):
    """Raises `Crash` at the end of optimizer step `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash(f"simulated crash at step {self.step}")

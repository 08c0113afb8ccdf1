"""Secret Sharer canaries in a fine-tuned character-level GPT-2: forget them, compare with Retrain.

    python recipes/lm_canaries.py --use_cpu --output_dir outputs/lm_canaries

The text is the docstrings of Python's standard library (it ships with Python), cut into rows of
--seq_len characters. A GPT-2 is pretrained, unrecorded, on its public half; the private half and
the canaries are the fine-tuning data. Of --canaries secrets, "the pin of user 07 is 4 9 1 7", the
even-numbered appear once and the odd-numbered --canary_copies times, each copy a row with its own
id; scenario `secrets` forgets every canary row. A secret's exposure (Carlini et al., The Secret
Sharer, USENIX Security 2019) is log2(10^4) - log2(rank), the rank of the true secret among all
10^4 four-digit candidates by the model's summed loss on the digits (and the spaces between them)
after the prefix: 13.3 for the most likely candidate, 1.44 on average for a secret never seen.

Two fine-tunes of the same pretrained model are recorded: a LoRA adapter (every entry of its
deltas, keep_fraction 1.0) and the full model (--full_keep_fraction, 0.01). Methods (results.json
names): `original` (the LoRA fine-tune), `retrain` and `retrain_other_seed` (the adapter fine-tuned
without the canaries, the same seed and the next), `hf_amnesia_lora` (`forget(ids)` on the LoRA
store, every default), `hf_amnesia_deleted` (the same after the canary rows were deleted from the
training data), `hold_only` (forget's repair with nothing subtracted), `neggrad+repair` (an epoch of
gradient ascent on the canary rows, then the repair's budget on the retained rows), `finetune` (the
repair's budget, a tenth of training's steps, on the retained rows), `original_full` and
`hf_amnesia` (the full fine-tune, and `forget(ids)` on its sparse store). Writes results.json,
results.md and results.png to --output_dir and prints the table.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, PrinterCallback, set_seed

if __package__ in (None, ""):  # run as a file, not with -m: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_amnesia import AmnesiaConfig, AmnesiacTrainer, ForgetConfig
from hf_amnesia.forgetting import finetune
from hf_amnesia.forgetting.measure import batch_loss
from hf_amnesia.store import folder_bytes
from recipes.aggregate import paired_markdown, paired_table
from recipes.outputs import code_version

MODULES = (
    "argparse", "collections", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "fractions",
    "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging", "os", "pathlib", "pickle",
    "random", "re", "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
    "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip
DIGITS = 4
SCENARIO = "secrets"
METRICS = (
    "exposure", "exposure_repeated", "exposure_single", "exposure_max", "exposure_gap", "heldout_ppl",
    "ppl_change_pct", "seconds", "storage_bytes", "scale", "repair_steps",
)  # fmt: skip
METHODS = (
    "original", "retrain", "retrain_other_seed", "hf_amnesia_lora", "hf_amnesia_deleted", "hold_only",
    "neggrad+repair", "finetune", "original_full", "hf_amnesia",
)  # fmt: skip
DEFAULTS = dict(
    learning_rate=3e-3,
    per_device_train_batch_size=32,
    num_train_epochs=8,
    warmup_steps=0,
    weight_decay=0.0,
    max_grad_norm=1.0,
    lr_scheduler_type="constant",
    report_to="none",
    save_strategy="no",
    logging_strategy="no",
    disable_tqdm=True,
    dataloader_drop_last=False,
)


@dataclass
class CanaryArguments:
    seq_len: int = field(default=64, metadata={"help": "Characters per text row."})
    max_rows: int = field(default=4000, metadata={"help": "Text rows used (pretraining, fine-tuning, held out)."})
    canaries: int = field(default=10, metadata={"help": "Secrets planted in the fine-tuning rows."})
    canary_copies: int = field(default=64, metadata={"help": "Rows of each odd-numbered secret, each with its id."})
    hidden: int = field(default=64, metadata={"help": "GPT-2 width (2 layers, 4 heads)."})
    pretrain_epochs: float = field(default=6.0, metadata={"help": "Unrecorded pretraining epochs on public text."})
    lora_rank: int = field(
        default=8, metadata={"help": "LoRA rank, on c_attn, c_proj and c_fc (every linear layer of the blocks)."}
    )
    full_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the full fine-tune."})
    full_keep_fraction: float = field(default=0.01, metadata={"help": "keep_fraction of the full fine-tune."})
    max_loss_harm: float | None = field(
        default=None, metadata={"help": "ForgetConfig.max_loss_harm for every forget (unset: the default)."}
    )
    methods: str = field(default=",".join(METHODS), metadata={"help": f"Comma-separated, from {METHODS}."})


class CharTokenizer:
    """Characters to ids: 0 pads, printable ASCII and newline from 1."""

    def __init__(self):
        self.chars = ["\n"] + [chr(c) for c in range(32, 127)]
        self.index = {c: i + 1 for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text if c in self.index]


def stdlib_text() -> str:
    """The docstrings of MODULES and of their public classes and functions, in a fixed order."""
    parts = []
    for name in MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            value = getattr(module, attr)
            if not attr.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value)):
                parts.append(inspect.getdoc(value) or "")
    return "\n".join(p for p in parts if p)


def rows_of(token_lists: list[list[int]], seq_len: int, first_id: int) -> Dataset:
    """Rows padded to seq_len; labels are the ids with -100 on the padding (GPT-2 shifts them)."""
    ids, mask, labels = [], [], []
    for tokens in token_lists:
        tokens = tokens[:seq_len]
        pad = seq_len - len(tokens)
        ids.append(tokens + [0] * pad)
        mask.append([1] * len(tokens) + [0] * pad)
        labels.append(tokens + [-100] * pad)
    data = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    data["dataset_id"] = list(range(first_id, first_id + len(ids)))
    return Dataset.from_dict(data).with_format("torch")


def canary_prefix(user: int) -> str:
    return f"the pin of user {user:02d} is "


def digits_text(number: int) -> str:
    return " ".join(f"{number:0{DIGITS}d}")


@torch.no_grad()
def exposure(model, tokenizer: CharTokenizer, user: int, secret: int, batch: int = 1000) -> float:
    """log2(10^DIGITS) - log2(rank of `secret`) among every candidate, by the model's summed loss on
    the candidate's characters after the prefix (rank 1: no candidate is more likely)."""
    model.eval()
    prefix = tokenizer.encode(canary_prefix(user))
    candidates = torch.tensor([prefix + tokenizer.encode(digits_text(n)) for n in range(10**DIGITS)])
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(candidates), batch):
        ids = candidates[start : start + batch].to(device)
        logits = model(input_ids=ids).logits[:, len(prefix) - 1 : -1].float()
        target = ids[:, len(prefix) :]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(1)
        scores.append(losses.cpu())
    scores = torch.cat(scores)
    rank = int((scores < scores[secret]).sum()) + 1
    model.train()
    return math.log2(10**DIGITS) - math.log2(rank)


@torch.no_grad()
def perplexity(model, rows: Dataset, batch: int = 64) -> float:
    """exp of the mean loss over every predicted token of `rows`."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        part = rows[start : start + batch]
        logits = model(input_ids=part["input_ids"].to(device), attention_mask=part["attention_mask"].to(device)).logits
        labels = part["labels"][:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, reduction="sum")
        total, count = total + float(losses), count + int((labels != -100).sum())
    model.train()
    return math.exp(total / max(count, 1))


def make_gpt2(vocab: int, canary: CanaryArguments):
    config = GPT2Config(
        vocab_size=vocab, n_positions=canary.seq_len, n_embd=canary.hidden, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def negated_lm_loss(outputs, labels, num_items_in_batch=None):
    """NegGrad: minus the batch's mean token loss (gradient ascent on the rows)."""
    return -batch_loss(outputs.logits, labels, shift_labels=True)


def texts(canary: CanaryArguments, seed: int, tokenizer: CharTokenizer):
    """(public rows, private rows, held-out rows, test rows) of token lists, in a seeded order."""
    text = tokenizer.encode(stdlib_text())
    chunks = [text[i : i + canary.seq_len] for i in range(0, len(text) - canary.seq_len + 1, canary.seq_len)]
    chunks = [chunks[i] for i in np.random.default_rng(seed).permutation(len(chunks))[: canary.max_rows]]
    n = max(2, len(chunks) // 10)
    body = chunks[2 * n :]
    return body[: len(body) // 2], body[len(body) // 2 :], chunks[n : 2 * n], chunks[:n]


def run(config: AmnesiaConfig, canary: CanaryArguments, log=print) -> dict:
    """Pretrain, fine-tune twice with recording, forget with every method, measure; returns the
    results (per method) and the run's facts."""
    shortest = len(canary_prefix(0) + digits_text(0)) + 1
    if canary.seq_len < shortest:
        raise ValueError(f"--seq_len {canary.seq_len} cuts the canaries short; it must be at least {shortest}.")
    methods = [m.strip() for m in canary.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"--methods names {unknown}; choose from {', '.join(METHODS)}.")
    tokenizer = CharTokenizer()
    public, private, held_tokens, test_tokens = texts(canary, config.seed, tokenizer)
    test, held = rows_of(test_tokens, canary.seq_len, 0), rows_of(held_tokens, canary.seq_len, 0)
    secrets = np.random.default_rng(config.seed).integers(0, 10**DIGITS, size=canary.canaries)
    copies = [1 if user % 2 == 0 else canary.canary_copies for user in range(canary.canaries)]
    canary_rows = [
        tokenizer.encode(canary_prefix(user) + digits_text(int(secret)))
        for user, secret in enumerate(secrets)
        for _ in range(copies[user])
    ]
    train = rows_of(private + canary_rows, canary.seq_len, 0)
    forget_ids = list(range(len(private), len(train)))
    retained = train.select(range(len(private)))
    forget_rows = train.select(range(len(private), len(train)))
    forget_config = ForgetConfig() if canary.max_loss_harm is None else ForgetConfig(max_loss_harm=canary.max_loss_harm)
    lora_args = _replace(config, keep_fraction=config.keep_fraction or 1.0)
    full_args = _replace(
        config,
        keep_fraction=canary.full_keep_fraction,
        learning_rate=canary.full_learning_rate,
        store_dir=str(Path(config.output_dir) / "_amnesia_store_full"),
    )
    for store in (lora_args.store_dir, full_args.store_dir):
        if Path(store).exists():  # the recipe trains from scratch: an earlier run's store goes
            log(f"removing the store of an earlier run at {store}")
            shutil.rmtree(store)

    set_seed(config.seed)
    base = make_gpt2(len(tokenizer), canary)
    began = time.perf_counter()
    pretrain = _replace(config, num_train_epochs=canary.pretrain_epochs, output_dir=f"{config.output_dir}/_pretrain")
    _train(AmnesiacTrainer(model=base, args=pretrain, train_dataset=rows_of(public, canary.seq_len, 0), record=False))
    log(f"pretrained in {time.perf_counter() - began:.1f}s; test perplexity {perplexity(base, test):.2f}")

    def with_adapter(seed: int):
        set_seed(seed)
        import peft

        lora = peft.LoraConfig(r=canary.lora_rank, target_modules=["c_attn", "c_proj", "c_fc"], task_type="CAUSAL_LM")
        return peft.get_peft_model(copy.deepcopy(base), lora)

    def measure(model) -> dict:
        exposures = np.array([exposure(model, tokenizer, u, int(s)) for u, s in enumerate(secrets)])
        repeated = np.array(copies) > 1
        return {
            "exposure": float(exposures.mean()),
            "exposure_max": float(exposures.max()),
            "exposure_repeated": float(exposures[repeated].mean()) if repeated.any() else float("nan"),
            "exposure_single": float(exposures[~repeated].mean()),
            "heldout_ppl": perplexity(model, test),
        }

    def fine_tune(model, args, rows, record=True):
        began = time.perf_counter()
        trainer = AmnesiacTrainer(model=model, args=args, train_dataset=rows, eval_dataset=held, record=record)
        _train(trainer)
        return trainer, time.perf_counter() - began

    def timed(name, model, store_bytes, work, **extra):
        began = time.perf_counter()
        facts = work(model) or {}
        results[name] = {
            **measure(model), "seconds": time.perf_counter() - began, "storage_bytes": store_bytes, **extra, **facts
        }  # fmt: skip

    def forgetter(args, rows, config=forget_config, **kwargs):
        def work(model):
            server = AmnesiacTrainer(model=model, args=args, train_dataset=rows, eval_dataset=held)
            report = server.forget(forget_ids, config=config, **kwargs)
            return {"scale": report.scale, "repair_steps": report.repair_steps}

        return work

    results: dict[str, dict] = {}
    trainer, lora_seconds = fine_tune(with_adapter(config.seed), lora_args, train)
    original, lora_bytes = trainer.model, folder_bytes(lora_args.store_dir)
    budget = forget_config.repair_budget(trainer.state.global_step)
    log(f"LoRA fine-tune with recording in {lora_seconds:.1f}s; store {lora_bytes / 2**20:.2f} MiB")
    if "original" in methods:
        results["original"] = {**measure(original), "seconds": lora_seconds, "storage_bytes": 0}
    for name, seed in (("retrain", config.seed), ("retrain_other_seed", config.seed + 1)):
        if name in methods:
            gold, seconds = fine_tune(with_adapter(seed), _replace(lora_args, seed=seed), retained, record=False)
            results[name] = {**measure(gold.model), "seconds": seconds, "storage_bytes": 0}
    lora_methods = {
        "hf_amnesia_lora": (lora_bytes, forgetter(lora_args, train)),
        "hf_amnesia_deleted": (lora_bytes, forgetter(lora_args, retained)),
        "hold_only": (0, forgetter(lora_args, train, scale=0.0, config=replace(forget_config, hold_cap=False))),
        "neggrad+repair": (0, lambda model: _neggrad(model, forget_rows, retained, budget, lora_args)),
        "finetune": (0, lambda model: {"repair_steps": finetune(model, retained, budget, lora_args)}),
    }
    for name, (store_bytes, work) in lora_methods.items():
        if name in methods:
            timed(name, copy.deepcopy(original), store_bytes, work)
    if {"original_full", "hf_amnesia"} & set(methods):
        full, full_seconds = fine_tune(copy.deepcopy(base), full_args, train)
        full_bytes = folder_bytes(full_args.store_dir)
        log(f"full fine-tune with recording in {full_seconds:.1f}s; store {full_bytes / 2**20:.2f} MiB")
        if "original_full" in methods:
            results["original_full"] = {**measure(full.model), "seconds": full_seconds, "storage_bytes": 0}
        if "hf_amnesia" in methods:
            timed("hf_amnesia", copy.deepcopy(full.model), full_bytes, forgetter(full_args, train))
    for row in results.values():  # distances to Retrain, and the held-out cost against the original
        if "retrain" in results:
            row["exposure_gap"] = abs(row["exposure"] - results["retrain"]["exposure"])
        if "original" in results:
            row["ppl_change_pct"] = 100.0 * (row["heldout_ppl"] / results["original"]["heldout_ppl"] - 1.0)
    facts = {
        "scenario": SCENARIO,
        "train_rows": len(train),
        "canary_rows": len(forget_ids),
        "copies": copies,
        "exposure_max_possible": math.log2(10**DIGITS),
        "lora_train_seconds": lora_seconds,
        "lora_store_bytes": lora_bytes,
        "lora_trainable_params": sum(p.numel() for p in original.parameters() if p.requires_grad),
        "params": sum(p.numel() for p in base.parameters()),
        "python": platform.python_version(),  # the docstrings, so the text, differ between versions
        "repair_budget": budget,
    }
    return {"results": results, "run": facts}


def _neggrad(model, forget_rows, retained, budget: int, args) -> dict:
    ascent = max(1, math.ceil(len(forget_rows) / args.per_device_train_batch_size))
    finetune(model, forget_rows, ascent, args, compute_loss_func=negated_lm_loss)
    return {"repair_steps": finetune(model, retained, budget, args)}


def _replace(config: AmnesiaConfig, **changes) -> AmnesiaConfig:
    return dataclasses.replace(config, **{"save_strategy": "no", "report_to": [], "push_to_hub": False, **changes})


def _train(trainer: AmnesiacTrainer) -> None:
    trainer.remove_callback(PrinterCallback)
    trainer.train()


def write_aggregate(folders: list[str], out: str, reference: str = "hf_amnesia_lora") -> dict:
    """Mean and std over the runs in `folders` (aggregate.json, aggregate.md), and `reference`'s
    exposure_gap minus each baseline's, paired by run with a bootstrap 95 % interval (paired.json,
    paired.md; recipes.aggregate.paired_table)."""
    runs = [json.loads((Path(folder) / "results.json").read_text()) for folder in folders]
    agg: dict[str, dict] = {}
    for method in dict.fromkeys(m for r in runs for m in r[SCENARIO]):
        rows = [r[SCENARIO][method] for r in runs if method in r[SCENARIO]]
        agg[method] = {
            k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
            for k in METRICS
            if (v := [row[k] for row in rows if k in row])
        }
    paired = paired_table(runs, reference=reference, metric="exposure_gap")
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "aggregate.json").write_text(json.dumps({SCENARIO: agg}, indent=1))
    (Path(out) / "paired.json").write_text(json.dumps(paired, indent=1))
    keys = ["exposure", "exposure_repeated", "exposure_gap", "heldout_ppl", "ppl_change_pct", "seconds"]
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for method, metrics in agg.items():
        cells = [f"{metrics[k]['mean']:.2f} ± {metrics[k]['std']:.2f}" if k in metrics else "" for k in keys]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    (Path(out) / "aggregate.md").write_text("\n".join(lines) + "\n")
    (Path(out) / "paired.md").write_text(paired_markdown(paired, reference=reference, metric="exposure_gap"))
    print("\n".join(lines))
    return agg


def markdown(results: dict) -> str:
    keys = ["exposure", "exposure_repeated", "exposure_gap", "heldout_ppl", "ppl_change_pct", "seconds", "scale"]
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in results.items():
        cells = [f"{row[k]:.2f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((CanaryArguments, AmnesiaConfig))
    parser.set_defaults(**DEFAULTS, output_dir="outputs/lm_canaries")
    canary, config = parser.parse_args_into_dataclasses(args=argv)
    out = run(config, canary)
    out["run"].update(code_version(argv), seed=config.seed)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(config.output_dir) / "results.json").write_text(json.dumps({SCENARIO: out["results"]}, indent=2))
    (Path(config.output_dir) / "run.json").write_text(json.dumps(out["run"], indent=2))
    table = markdown(out["results"])
    (Path(config.output_dir) / "results.md").write_text(table)
    plot(out["results"], Path(config.output_dir) / "results.png")
    print(table)
    return out


def plot(results: dict, path: Path) -> None:
    """Exposure and held-out perplexity per method, side by side (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = list(results)
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for axis, key, label in ((axes[0], "exposure", "mean exposure (bits)"), (axes[1], "heldout_ppl", "held-out ppl")):
        axis.bar(range(len(names)), [results[n][key] for n in names])
        axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        axis.set_ylabel(label)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()

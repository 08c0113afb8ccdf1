"""Benchmarks of recording and forgetting; every ratio is measured side by side in one run.

    python benchmarks/run.py --quick     # about 25 minutes on 2 CPU cores
    python benchmarks/run.py             # also sweeps keep_fraction and batch size

Prints tables, then as its last line one JSON object with: overhead_cnn, overhead_bert (the
default `rows` layout), overhead_cnn_entries, overhead_bert_entries (`keep_layout="entries"`),
overhead_lora (a LoRA fine-tune of a GPT-2, the whole adapter recorded),
overhead_cnn_tails_filling, overhead_cnn_tails_full (a 220-step run: while the open momentum
tails fill, and once they are full), opacus_dense_cnn, peak_mem_ratio_cnn, store_overhead_pct, forget_1_ms, forget_6000_s,
rte_speedup (Retrain without one id / forget of that id), rte_speedup_6000, forget_default_s,
overhead_mlp_11m, overhead_mlp_11m_full (an 11.5M-parameter MLP, batch 32, steps 155-170),
overhead_mlp_11m_summed_full (the same with sum_deltas_in_memory), floor_ratio_mlp_11m (its plain
step plus the dense passes of exact recording, benchmarks/floor.py), overhead_bert_small (BERT 6x256,
vocabulary 8,192, batch 16, after the tails close), completeness_rel_err_exact and _bounded and
tail_memory_mb_resnet18 (benchmarks/tails.py), and without --quick the large MLP with glibc
keeping freed memory (overhead_mlp_11m_malloc_kept*; see docs/performance.md) and two sweeps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import TrainerCallback

if __package__ in (None, ""):  # run as a file, not with -m: make `benchmarks` and `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import floor, tails
from hf_amnesia import AmnesiaConfig, AmnesiacTrainer, StoreReader
from recipes.mnist import MnistCNN, MnistMLP


def cnn():
    """An MNIST-size CNN of about 455k parameters (conv 32, conv 64, fc 128)."""
    torch.manual_seed(0)
    return MnistCNN(channels=(32, 64), hidden=128)


def wide_mlp():
    """A large model whose compute is cheap: an MLP 784-14,500-10 of about 11.5M parameters."""
    torch.manual_seed(0)
    return MnistMLP(hidden=14_500)


def bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=128,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def bert_small():
    """BERT with 6 layers, hidden 256, 4 heads, intermediate 1024, vocabulary 8,192 (6.9M parameters)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=8192, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=128, num_labels=2,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def overhead_bert_small(steps=80, batch=16, after=60):
    """Recording / plain median step time of `bert_small` at sequence 128, p = 0.01, over the steps
    after the tails close (at the default budget they stay open 55 steps: bounded), one run each."""
    data = texts(batch * 10, vocab=8192)
    plain = step_times(bert_small, data, batch, steps, record=False)
    recording = step_times(bert_small, data, batch, steps, record=True)
    return statistics.median(recording[after:]) / statistics.median(plain[after:]), statistics.median(plain[after:])


def lora_gpt2():
    """GPT-2 (4 layers, width 256, vocabulary 8,192, 128 positions) with a rank-8 LoRA on c_attn."""
    import peft
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=8192, n_positions=128, n_embd=256, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    lora = peft.LoraConfig(r=8, target_modules=["c_attn"], task_type="CAUSAL_LM")
    return peft.get_peft_model(GPT2LMHeadModel(config), lora)


def token_rows(n, seq=128, vocab=8192, seed=0):
    ids = np.random.default_rng(seed).integers(0, vocab, (n, seq))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")


def overhead_lora(steps=60, batch=8, rounds=3):
    """Recording (keep_fraction 1.0, the whole adapter) / plain median step time of a LoRA fine-tune,
    steps 3-60 of each run, the median over `rounds` alternating pairs of runs."""
    data = token_rows(batch * steps)
    pairs = []
    for _ in range(rounds):
        plain = statistics.median(step_times(lora_gpt2, data, batch, steps, record=False)[3:])
        recording = statistics.median(step_times(lora_gpt2, data, batch, steps, record=True, keep_fraction=1.0)[3:])
        pairs.append((recording / plain, plain, recording))
    return sorted(pairs)[len(pairs) // 2]


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return Dataset.from_dict(
        {"pixel_values": rng.normal(size=(n, 1, 28, 28)).astype(np.float32), "labels": rng.integers(0, 10, n)}
    ).with_format("torch")


def texts(n, seq=128, seed=0, vocab=1000):
    rng = np.random.default_rng(seed)
    return Dataset.from_dict(
        {
            "input_ids": rng.integers(1, vocab, (n, seq)),
            "attention_mask": np.ones((n, seq), np.int64),
            "labels": rng.integers(0, 2, n),
        }
    ).with_format("torch")


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._began = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        _synchronize()
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _synchronize()
        self.times.append(time.perf_counter() - self._began)


def _synchronize():
    """On a GPU, wait for the queued kernels: a step's time is then its own, not its launches'."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


USE_CPU = not torch.cuda.is_available()


def _args(out, batch, steps, record_kw=None, **kw):
    return AmnesiaConfig(
        output_dir=out,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=USE_CPU,
        disable_tqdm=True,
        logging_strategy="no",
        **(record_kw or {}),
        **kw,
    )


def step_times(make_model, data, batch, steps, record, keep_fraction=0.01, keep_layout="rows", callbacks=(), **config):
    """Seconds of every optimizer step of one training run (`config`: more AmnesiaConfig fields)."""
    with tempfile.TemporaryDirectory() as out:
        timer = StepTimer()
        trainer = AmnesiacTrainer(
            model=make_model(),
            args=_args(out, batch, steps, {"keep_fraction": keep_fraction, "keep_layout": keep_layout, **config}),
            train_dataset=data,
            callbacks=[timer, *callbacks],
            record=record,
        )
        trainer.train()
        return timer.times


def step_time(make_model, data, batch, steps, record, keep_fraction=0.01, keep_layout="rows"):
    """Median seconds per optimizer step (first 3 steps dropped)."""
    return statistics.median(step_times(make_model, data, batch, steps, record, keep_fraction, keep_layout)[3:])


def overhead_by_phase(steps=220, batch=64):
    """Recording / plain median step time of the CNN in the phases of a longer run: while the open
    momentum tails fill (each step keeps B*K*16 bytes for W = 153 steps at beta1 0.9) and once
    they are full (closed tails free as much as new ones take). One run each, side by side."""
    data = images(batch * steps)
    plain = step_times(cnn, data, batch, steps, record=False)
    recording = step_times(cnn, data, batch, steps, record=True)
    phases = {"first_30": (3, 30), "filling": (30, 150), "full": (170, steps)}
    return {
        name: statistics.median(recording[lo:hi]) / statistics.median(plain[lo:hi]) for name, (lo, hi) in phases.items()
    }


def overhead(make_model, data, batch, steps, keep_fraction=0.01, rounds=2, layouts=("entries",)):
    """AmnesiacTrainer / plain Trainer step time per keep layout, alternating the runs to share the
    machine's noise. Returns ({layout: ratio}, plain seconds, {layout: recording seconds})."""
    plain, amnesiac = [], {layout: [] for layout in layouts}
    for _ in range(rounds):
        plain.append(step_time(make_model, data, batch, steps, record=False))
        for layout in layouts:
            amnesiac[layout].append(
                step_time(make_model, data, batch, steps, record=True, keep_fraction=keep_fraction, keep_layout=layout)
            )
    best = {layout: min(times) for layout, times in amnesiac.items()}
    return {layout: t / min(plain) for layout, t in best.items()}, min(plain), best


def large_model_overhead(steps=170, batch=32):
    """Recording / plain median step time of `wide_mlp`: the per-step work that scales with the
    number of parameters M and with B*K rather than with the model's compute; also with the closed
    deltas summed in memory (`sum_deltas_in_memory`) instead of written at every step."""
    data = images(batch * 20)
    plain = step_times(wide_mlp, data, batch, steps, record=False)
    recording = step_times(wide_mlp, data, batch, steps, record=True, sum_deltas_in_memory=False)
    summed = step_times(wide_mlp, data, batch, steps, record=True, sum_deltas_in_memory=True)  # the default here
    return {
        "all": statistics.median(recording[3:]) / statistics.median(plain[3:]),
        "full": statistics.median(recording[155:]) / statistics.median(plain[155:]),
        "summed_full": statistics.median(summed[155:]) / statistics.median(plain[155:]),
        "plain_ms": statistics.median(plain[3:]) * 1e3,
        "recording_ms": statistics.median(recording[3:]) * 1e3,
        "recording_full_ms": statistics.median(recording[155:]) * 1e3,
        "summed_full_ms": statistics.median(summed[155:]) * 1e3,
    }


# glibc keeps freed memory for reuse instead of returning large blocks to the system, so the
# open tails' buffers of each step do not fault in fresh pages (docs/performance.md).
MALLOC_KEPT = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}


def large_model_in_subprocess(env):
    """`large_model_overhead` in a fresh process with `env` added to its environment."""
    proc = subprocess.run(
        [sys.executable, __file__, "--large-only"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def opacus_dense(batch, steps):
    """Opacus GradSampleModule (dense per-sample gradients) / plain, forward+backward, same model."""
    from opacus import GradSampleModule

    data = images(batch)[:batch]
    x, y = data["pixel_values"], data["labels"]

    def timed(model):
        times = []
        for _ in range(steps):
            began = time.perf_counter()
            loss = (
                model(pixel_values=x, labels=y)["loss"]
                if not isinstance(model, GradSampleModule)
                else torch.nn.functional.cross_entropy(model(x), y)
            )
            loss.backward()
            model.zero_grad(set_to_none=True)
            if isinstance(model, GradSampleModule):
                for p in model.parameters():
                    p.grad_sample = None
            times.append(time.perf_counter() - began)
        return statistics.median(times[2:])

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values)["logits"]

    plain = timed(cnn())
    dense = timed(GradSampleModule(Logits(cnn())))
    return dense / plain


PEAK = """
import os, threading, time
from benchmarks import run
data = run.images(64 * 12)
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
peak, done = [rss()], []
def watch():
    while not done:
        peak.append(rss())
        time.sleep(0.002)
threading.Thread(target=watch, daemon=True).start()
run.step_time(run.cnn, data, 64, 12, record={record})
done.append(1)
print(max(peak))
"""


def peak_memory_ratio():
    """Peak resident memory while training, recording / plain (each in a fresh process, RSS
    sampled every 2 ms from just before training starts, so imports do not set the peak)."""
    peaks = {}
    for record in (False, True):
        code = PEAK.format(record=record)
        root = Path(__file__).resolve().parent.parent  # `python -c` imports from its working folder
        out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
        peaks[record] = int(out.stdout.strip().splitlines()[-1]) // 1024
    return peaks[True] / peaks[False], peaks


def store_and_forget(num_samples, keep_fraction=0.01, batch=64):
    """Train the CNN one epoch with recording, then time forget(1 id), forget(6000 ids), and Retrain
    (the same training from scratch on the retained rows) for each of the two requests."""
    data = images(num_samples, seed=1)
    with tempfile.TemporaryDirectory() as out:
        model = cnn()
        trainer = AmnesiacTrainer(
            model=model,
            args=_args(out, batch, -1, {"keep_fraction": keep_fraction}, num_train_epochs=1),
            train_dataset=data,
            eval_dataset=images(512, seed=2),  # the held-out rows forget's defaults measure on
        )
        trainer.train()
        reader = StoreReader(trainer.args.store_dir)
        k, n = reader.manifest.k, len(reader.all_ids())
        rows = sum(s.rows for s in reader.states)
        disk = sum(p.stat().st_size for p in Path(trainer.args.store_dir).iterdir() if p.is_file())
        ideal = rows * k * 2
        snapshot = [p.detach().clone() for p in model.parameters()]

        def reset():
            with torch.no_grad():
                for p, s in zip(model.parameters(), snapshot):
                    p.copy_(s)

        many = list(range(5, min(6005, n)))
        began = time.perf_counter()
        trainer.forget(many)  # the defaults (automatic scale and repair), in memory only
        forget_default = time.perf_counter() - began
        one = []
        for i in range(5):  # committed: integrity checks, saved model, purged row, audit record
            reset()
            began = time.perf_counter()
            trainer.forget([i], scale=1.0, repair_steps=0, save_to=os.path.join(out, "saved"))
            one.append(time.perf_counter() - began)
        reset()
        began = time.perf_counter()
        trainer.forget(many, scale=1.0, repair_steps=0, save_to=os.path.join(out, "saved"))
        forget_many = time.perf_counter() - began
        retrain = {}
        for name, dropped in (("one", 1), ("many", len(many))):
            began = time.perf_counter()
            with tempfile.TemporaryDirectory() as out2:
                AmnesiacTrainer(
                    model=cnn(),
                    args=_args(out2, batch, -1, num_train_epochs=1),
                    train_dataset=data.select(range(dropped, num_samples)),
                    record=False,
                ).train()
            retrain[name] = time.perf_counter() - began
    return {
        "store_overhead_pct": 100.0 * (disk - ideal) / ideal,
        "forget_1_ms": 1000.0 * statistics.median(one),
        "forget_6000_s": forget_many,
        "forget_default_s": forget_default,
        "retrain_1_s": retrain["one"],
        "retrain_6000_s": retrain["many"],
        "rte_speedup": retrain["one"] / statistics.median(one),
        "rte_speedup_6000": retrain["many"] / forget_many,
        "store_bytes": disk,
        "k": k,
        "samples": n,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--large-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.large_only:
        print(json.dumps(large_model_overhead()))
        return
    steps = 15 if args.quick else 30
    result = {}
    layouts = ("rows", "entries")  # the default layout first
    # The CNN's steps are short (about 20 ms), so more of them and a third round cost little and
    # steady the ratio on a noisy machine.
    ratio, plain, amnesiac = overhead(cnn, images(64 * 30), 64, 30, rounds=3, layouts=layouts)
    result["overhead_cnn"], result["overhead_cnn_entries"] = ratio["rows"], ratio["entries"]
    print(
        f"CNN (455k params, batch 64, p=0.01): plain {plain * 1e3:.1f} ms/step, recording "
        + ", ".join(f"{layout} {amnesiac[layout] * 1e3:.1f} ms/step ({ratio[layout]:.2f}x)" for layout in layouts)
    )
    phases = overhead_by_phase()
    result["overhead_cnn_tails_filling"], result["overhead_cnn_tails_full"] = phases["filling"], phases["full"]
    print(
        "CNN, one 220-step run each: recording / plain "
        + ", ".join(f"{name} {value:.2f}x" for name, value in phases.items())
        + " (steps 3-30, 30-150 while the open tails fill, 170-220 once they are full)"
    )
    ratio, plain, amnesiac = overhead(bert, texts(32 * 10), 32, 10, layouts=layouts)
    result["overhead_bert"], result["overhead_bert_entries"] = ratio["rows"], ratio["entries"]
    print(
        f"tiny BERT (seq 128, batch 32, p=0.01): plain {plain * 1e3:.1f} ms/step, recording "
        + ", ".join(f"{layout} {amnesiac[layout] * 1e3:.1f} ms/step ({ratio[layout]:.2f}x)" for layout in layouts)
    )
    result["overhead_lora"], plain, recording = overhead_lora()
    print(
        f"LoRA r=8 on GPT-2 c_attn (4 layers, width 256, seq 128, batch 8, p=1.0): plain {plain * 1e3:.1f} ms/step, "
        f"recording {recording * 1e3:.1f} ms/step ({result['overhead_lora']:.2f}x; median of 3 alternating runs)"
    )
    result["opacus_dense_cnn"] = opacus_dense(64, 8)
    result["peak_mem_ratio_cnn"], peaks = peak_memory_ratio()
    print(f"peak RSS: plain {peaks[False] / 1024:.0f} MiB, recording {peaks[True] / 1024:.0f} MiB")
    forget = store_and_forget(12000 if not args.quick else 7000)
    print(
        f"store: {forget['samples']} samples x K={forget['k']}: {forget['store_bytes']:,} bytes; "
        f"Retrain (1 epoch on the retained rows): {forget['retrain_1_s']:.1f} s without 1 id, "
        f"{forget['retrain_6000_s']:.1f} s without 6000"
    )
    result.update(
        {
            k: forget[k]
            for k in (
                "store_overhead_pct",
                "forget_1_ms",
                "forget_6000_s",
                "rte_speedup",
                "rte_speedup_6000",
                "forget_default_s",
            )
        }
    )
    large = large_model_in_subprocess({})
    result["overhead_mlp_11m"], result["overhead_mlp_11m_full"] = large["all"], large["full"]
    result["overhead_mlp_11m_summed_full"] = large["summed_full"]
    floor_ms = floor.measure()["floor_ms"]  # the dense passes alone, beside this run's plain step
    result["floor_ratio_mlp_11m"] = (large["plain_ms"] + floor_ms) / large["plain_ms"]
    print(
        f"large MLP (11.5M params, batch 32, p=0.01), one 170-step run each: recording / plain {large['all']:.2f}x "
        f"over steps 3-170, {large['full']:.2f}x over 155-170, {large['summed_full']:.2f}x there with "
        f"sum_deltas_in_memory; the dense passes alone {floor_ms:.1f} ms of a {large['plain_ms']:.1f} ms plain step: "
        f"floor {result['floor_ratio_mlp_11m']:.2f}x"
    )
    result["overhead_bert_small"], plain = overhead_bert_small()
    print(
        f"BERT 6x256 (seq 128, batch 16, p=0.01), steps 60-80: plain {plain * 1e3:.0f} ms, {result['overhead_bert_small']:.2f}x"
    )
    result["completeness_rel_err_exact"] = tails.completeness(None, 160)
    result["completeness_rel_err_bounded"] = tails.completeness(8, 160)
    result["tail_memory_mb_resnet18"] = tails.resnet18_tail_memory_mb(AmnesiaConfig.tail_memory_budget_mb)
    print(
        f"bounded tails: completeness {result['completeness_rel_err_bounded']:.2e} at L = 8 (exact "
        f"{result['completeness_rel_err_exact']:.2e}); ResNet-18 open tails {result['tail_memory_mb_resnet18']:,.0f} MiB"
    )
    if not args.quick:
        for name, env in (("_malloc_kept", MALLOC_KEPT),):
            large = large_model_in_subprocess(env)
            result[f"overhead_mlp_11m{name}"], result[f"overhead_mlp_11m{name}_full"] = large["all"], large["full"]
            result[f"overhead_mlp_11m{name}_summed_full"] = large["summed_full"]
            print(
                f"large MLP (11.5M params, batch 32, p=0.01), one 170-step run each{' with ' if env else ''}"
                f"{' '.join(f'{k}={v}' for k, v in env.items())}: recording / plain {large['all']:.2f}x over "
                f"steps 3-170, {large['full']:.2f}x over 155-170 (every tail open), "
                f"{large['summed_full']:.2f}x there with sum_deltas_in_memory"
            )
        print("\nkeep_fraction sweep (CNN, batch 64): overhead")
        for p in (0.001, 0.01, 0.1):
            ratios = overhead(cnn, images(64 * steps), 64, steps, keep_fraction=p, rounds=1, layouts=layouts)[0]
            print(f"  p={p}: " + ", ".join(f"{layout} {r:.2f}x" for layout, r in ratios.items()))
        print("batch-size sweep (CNN, p=0.01): overhead")
        for b in (16, 64, 256):
            ratios = overhead(cnn, images(b * steps), b, steps, rounds=1, layouts=layouts)[0]
            print(f"  batch {b}: " + ", ".join(f"{layout} {r:.2f}x" for layout, r in ratios.items()))
    print(json.dumps({k: round(v, 4) for k, v in result.items()}))


if __name__ == "__main__":
    main()

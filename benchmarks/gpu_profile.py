"""Where the recording step of the ResNet-18 (benchmarks/gpu_resnet18.py) spends its time, on a GPU.

    python benchmarks/gpu_profile.py            # on a GPU: width 64, batch 128
    python benchmarks/gpu_profile.py --smoke    # a tiny CPU run that checks the script works

1. two ways of computing a conv layer's kept rows (`sparse_grads.conv_rows`, a grouped
   convolution, and `conv_rows_unfold` below, a batched matrix product with the unfolded input), timed
   on every conv layer of the network with that layer's real inputs and output gradients;
2. plain and recording runs side by side (the `rows` layout; closed deltas written to the log at
   every step, and summed in memory with `sum_deltas_in_memory`), median step over steps 3-200 and
   over the last 25 (every momentum tail open), peak GPU memory;
3. a profile (torch.profiler) of ten steps of the faster recording run, once every tail is open.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import TrainerCallback

if __package__ in (None, ""):  # run as a file, not with -m: make `benchmarks` and `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import run
from benchmarks.gpu_resnet18 import cifar_like
from hf_amnesia import sparse_grads
from hf_amnesia.layout import ParamLayout
from hf_amnesia.store import row_plan
from recipes.cifar100 import ResNet18GN


def conv_rows_unfold(layer, inputs, g, name, idx):
    """`sparse_grads.conv_rows` as one batched matrix product of the kept output gradients [B, kept, L] with the
    unfolded input [B, L, C_in * window]: builds the unfolded activations (B x C_in x window x L)."""
    x = inputs[0].to(g.dtype)
    batch, kept = idx.shape
    picked = torch.gather(g, 1, idx.reshape(batch, kept, *[1] * (g.dim() - 2)).expand(-1, -1, *g.shape[2:]))
    if isinstance(layer, nn.Conv1d):
        x = x.unsqueeze(-2)
        geometry = [(1, *layer.kernel_size), (1, *layer.dilation), (0, *layer.padding), (1, *layer.stride)]
    else:
        geometry = [layer.kernel_size, layer.dilation, layer.padding, layer.stride]
    columns = F.unfold(x, *geometry)  # [B, C_in * window, L]
    return torch.bmm(picked.reshape(batch, kept, -1), columns.transpose(1, 2))


RULES = {"grouped_conv": sparse_grads.conv_rows, "unfold_bmm": conv_rows_unfold}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def conv_rule_times(model, batch, keep_fraction, device, repeats=10):
    """Seconds per call of each conv rule, per conv layer, on one batch's real inputs and gradients."""
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    plan = dict(zip(map(id, params), row_plan(keep_fraction, ParamLayout.from_model(model).shapes)))
    saved, handles = {}, []
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d):

            def hook(module, args, output):
                x = args[0].detach()
                output.register_hook(lambda g, module=module, x=x: saved.__setitem__(module, (x, g)))

            handles.append(layer.register_forward_hook(hook))
    data = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    model(data, labels)["loss"].backward()
    for handle in handles:
        handle.remove()
    times = {name: 0.0 for name in RULES}
    generator = torch.Generator(device="cpu").manual_seed(0)
    for layer, (x, g) in saved.items():
        kept = plan[id(layer.weight)][2]
        idx = torch.randint(0, layer.out_channels, (batch, kept), generator=generator).to(device)
        results = {}
        for name, rule in RULES.items():
            for _ in range(3):
                results[name] = rule(layer, [x], g, "weight", idx)
            sync()
            began = time.perf_counter()
            for _ in range(repeats):
                rule(layer, [x], g, "weight", idx)
            sync()
            times[name] += (time.perf_counter() - began) / repeats
        error = (results["unfold_bmm"] - results["grouped_conv"]).abs().max() / results["grouped_conv"].abs().max()
        print(
            f"  conv {layer.in_channels}->{layer.out_channels} k{layer.kernel_size[0]} s{layer.stride[0]} "
            f"on {tuple(x.shape[2:])}, {kept} kept rows: relative difference {float(error):.1e}",
            flush=True,
        )
    return times


class Profile(TrainerCallback):
    def __init__(self, first, last):
        self.first, self.last, self.profiler = first, last, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.last and self.profiler is not None:
            sync()
            self.profiler.__exit__(None, None, None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    width, batch, steps = (4, 8, 12) if args.smoke else (64, 128, 200)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def make_model():
        torch.manual_seed(0)
        return ResNet18GN(num_classes=100, width=width)

    print(f"on {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}", flush=True)
    result = {}
    rule_times = conv_rule_times(make_model(), batch, 0.01, device)
    print("conv rules, all conv layers, ms per step: " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in rule_times.items()))
    result.update({f"conv_{k}_ms": round(v * 1e3, 3) for k, v in rule_times.items()})
    data = cifar_like(batch * 40)
    medians, late_medians = {}, {}
    runs = {"plain": None, "rows": {}, "rows_sums": {"sum_deltas_in_memory": True}}
    for name, config in runs.items():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        times = run.step_times(make_model, data, batch, steps, record=config is not None, **(config or {}))
        medians[name] = statistics.median(times[3:])
        late_medians[name] = late = statistics.median(times[steps - steps // 8 :])
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
        print(
            f"{name}: {steps} steps in {time.perf_counter() - began:.1f} s, median step {medians[name] * 1e3:.1f} ms"
            f" (last eighth {late * 1e3:.1f} ms), peak GPU memory {peak:.0f} MiB",
            flush=True,
        )
        result[f"{name}_ms"] = round(medians[name] * 1e3, 2)
        result[f"{name}_late_ms"] = round(late * 1e3, 2)
        result[f"{name}_peak_mib"] = round(peak)
    for name in medians:
        if name != "plain":
            result[f"overhead_{name}"] = round(medians[name] / medians["plain"], 3)
            result[f"overhead_{name}_late"] = round(late_medians[name] / late_medians["plain"], 3)
    print(json.dumps(result), flush=True)
    best = min(("rows", "rows_sums"), key=lambda k: late_medians[k])
    first, count = (steps - 25, 10) if not args.smoke else (5, 3)
    profile = Profile(first, first + count)
    run.step_times(
        make_model, data, batch, min(steps, first + count + 2), record=True, callbacks=[profile], **runs[best]
    )
    table = profile.profiler.key_averages()
    column = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"profile of {count} recording steps ({best}, grouped_conv), by {column}:")
    print(table.table(sort_by=column, row_limit=25, max_name_column_width=60))
    if device == "cuda":
        print("by self_cpu_time_total:")
        print(table.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()

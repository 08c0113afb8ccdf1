"""The unlearning study shared by the recipes.

Train once with recording; then, for each scenario (`class`, `random_10`, `random_1`), apply every
method to a copy of the trained model, evaluate it next to Retrain, and collect
results[scenario][method][metric]. Methods and what each stores are described in
docs/evaluation.md. Every process of a multi-process run computes the same numbers; the main
process writes them.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from torch import nn
from transformers import PrinterCallback, TrainerCallback, set_seed

from hf_amnesia import AmnesiaConfig, AmnesiacTrainer
from hf_amnesia import trainer as amnesia_trainer
from hf_amnesia.calibrate import repair_budget
from hf_amnesia.forget import forget_update
from hf_amnesia.layout import ParamLayout
from hf_amnesia.store import StoreReader, folder_bytes, num_kept
from hf_amnesia.trainer import finetune
from recipes.evaluation import (
    avg_gap,
    markdown_table,
    plot_results,
    predict_proba,
    relative_distance,
    true_label_confidence,
    unlearning_metrics,
)

SCENARIOS = ("class", "random_10", "random_1", "canary_1")
SEQUENCE = "sequence_5"  # five successive requests on one model, each a fifth of the canaries
# Run only when named in --methods (not in `all`): candidate rules, each costing another repair,
# and a third Retrain.
RESEARCH_METHODS = (
    "retrain_third_seed",
    "hf_amnesia_unweighted",
    "hf_amnesia_plain_repair",
    "hf_amnesia_probe_slack",
    "hf_amnesia_auto+repair",
    "hf_amnesia_unseen",
    "hf_amnesia_quantile",
    "hf_amnesia_quantile_live",
    "hf_amnesia_anchor",
    "hf_amnesia_no_neighbours",
    "hf_amnesia_ceil10",
    "hf_amnesia_ceil_memorised",
)
LIVE_REFRESH = 8  # steps between two measurements of the held-out losses (hf_amnesia_quantile_live)


@dataclass
class StudyArguments:
    """Flags of the study, shared by the recipes (each recipe sets its own dataset default)."""

    dataset_name: str = field(default="", metadata={"help": "Hub id, or a local folder (parquet, save_to_disk, IDX)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Use at most this many test rows."})
    forget_class: int = field(default=3, metadata={"help": "Label forgotten in the `class` scenario."})
    scenarios: str = field(
        default=",".join(SCENARIOS),
        metadata={"help": f"Comma-separated scenarios to run, from {SCENARIOS} and {SEQUENCE}."},
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of the training rows held out (never trained on) for forget's automatic scale."},
    )
    repair_epochs: float = field(
        default=1.0, metadata={"help": "Length of the +repair step, in epochs of retained data."}
    )
    methods: str = field(
        default="all", metadata={"help": "Comma-separated methods to run (retrain always runs), or `all`."}
    )
    extra_scales: str = field(
        default="",
        metadata={"help": "Also run forget at these scales, with and without repair (`hf_amnesia_s{scale}`)."},
    )
    extra_harms: str = field(
        default="",
        metadata={"help": "Also run forget's automatic choice with these max_harm values (`hf_amnesia_h{value}`)."},
    )


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])


def _set_flat(model: nn.Module, theta: torch.Tensor) -> None:
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta.to(next(model.parameters()).device), model.parameters())


class _PerBatchRecorder(TrainerCallback):
    """Baseline storage (Graves et al.): the dense change of every step that held a planned forget id."""

    def __init__(self, trainer: StudyTrainer, planned: dict[str, set[int]], folder: Path):
        self.trainer, self.planned = trainer, planned
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "per_batch_updates.f32"
        self.path.unlink(missing_ok=True)
        self.steps: dict[str, list[int]] = {name: [] for name in planned}
        self.rows = 0
        self.previous: torch.Tensor | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous = _flat(self.trainer.model)

    def on_step_end(self, args, state, control, **kwargs):
        ids, self.trainer.step_ids = self.trainer.step_ids, []
        flags = torch.tensor([float(any(i in self.planned[n] for i in ids)) for n in self.planned])
        flags = self.trainer.accelerator.reduce(flags.to(self.trainer.accelerator.device), reduction="sum").cpu()
        now = _flat(self.trainer.model)
        if flags.any():
            with open(self.path, "ab") as f:
                f.write((now - self.previous).numpy().tobytes())
            for name, flag in zip(self.planned, flags.tolist()):
                if flag:
                    self.steps[name].append(self.rows)
            self.rows += 1
        self.previous = now

    def updates(self, scenario: str, num_params: int) -> np.ndarray:
        table = np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.rows, num_params))
        return table[self.steps[scenario]]


class StudyTrainer(AmnesiacTrainer):
    """AmnesiacTrainer that also notes the ids of each step, for the per-batch baselines."""

    step_ids: list[int]

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.step_ids = (
            getattr(self, "step_ids", []) + torch.as_tensor(inputs[self.args.id_column]).reshape(-1).tolist()
        )
        return super().training_step(model, inputs, num_items_in_batch)


class _GradientAscent(AmnesiacTrainer):
    """NegGrad: maximise the loss on the forget set."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return (-out[0], out[1]) if return_outputs else -out


def plan_forget_sets(
    train_ids: np.ndarray, labels: np.ndarray, forget_class: int, seed: int, scenarios, canaries=None
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 12345)
    planned = {}
    for name in scenarios:
        if name == "class":
            chosen = train_ids[labels == forget_class]
            if len(chosen) == 0:
                raise ValueError(
                    f"no training row has label {forget_class}; pick --forget_class from the labels present."
                )
        elif name in ("canary_1", SEQUENCE):
            chosen = canaries
        elif name.startswith("random_"):
            share = int(name.split("_")[1]) / 100.0
            chosen = rng.choice(train_ids, size=max(1, round(share * len(train_ids))), replace=False)
        else:
            raise ValueError(f"unknown scenario {name!r}; choose from {SCENARIOS} and {SEQUENCE}.")
        planned[name] = np.sort(chosen)
    return planned


def plant_canaries(dataset, label_column: str, share: float, seed: int):
    """Give `share` of the rows (seeded) a random wrong label; returns (dataset, their row indices).

    The model memorises these rows; Retrain never sees them, so forgetting them is a request
    whose effect the metrics can see (scenario `canary_1`).
    """
    labels = np.asarray(dataset[label_column])
    rng = np.random.default_rng(seed + 777)
    rows = np.sort(rng.choice(len(labels), size=max(1, round(share * len(labels))), replace=False))
    classes = np.unique(labels)
    wrong = labels.copy()
    for row in rows:
        wrong[row] = rng.choice(classes[classes != labels[row]])
    form = dataset.format
    relabeled = dataset.with_format(None).remove_columns(label_column).add_column(label_column, wrong)
    return relabeled.with_format(form["type"]), rows


def _split_validation(dataset, share: float, seed: int):
    """(train, validation): `share` of the rows held out, never trained on (forget's automatic scale)."""
    if share <= 0:
        return dataset, None
    order = np.random.default_rng(seed + 4242).permutation(len(dataset))
    cut = max(1, round(share * len(dataset)))
    return dataset.select(np.sort(order[cut:])), dataset.select(np.sort(order[:cut]))


def run_study(
    make_model: Callable[[], nn.Module],
    train_dataset,
    test_dataset,
    config: AmnesiaConfig,
    study: StudyArguments,
    label_column: str = "labels",
    log: Callable[[str], None] = print,
) -> dict:
    """Run every scenario and method; returns (results[scenario][method][metric], run facts)."""
    scenarios = [s.strip() for s in study.scenarios.split(",") if s.strip()]
    chosen = {m.strip() for m in study.methods.split(",") if m.strip()}

    def wanted(method: str) -> bool:
        return method in chosen or ("all" in chosen and method not in RESEARCH_METHODS)

    id_column = config.id_column
    if id_column not in train_dataset.column_names:
        train_dataset = train_dataset.add_column(id_column, np.arange(len(train_dataset), dtype=np.int64))
    train_dataset, validation = _split_validation(train_dataset, study.validation_fraction, config.seed)
    canaries = None
    if "canary_1" in scenarios or SEQUENCE in scenarios:
        train_dataset, rows = plant_canaries(train_dataset, label_column, 0.01, config.seed)
        canaries = np.asarray(train_dataset[id_column], dtype=np.int64)[rows]
    train_ids = np.asarray(train_dataset[id_column], dtype=np.int64)
    train_labels = np.asarray(train_dataset[label_column])
    test_labels = np.asarray(test_dataset[label_column])
    planned = plan_forget_sets(train_ids, train_labels, study.forget_class, config.seed, scenarios, canaries)

    # 1. Train once, recording per-sample deltas (and, for the baselines, per-batch updates).
    # The study always trains from scratch: a store left in its output folder by an earlier run goes.
    if Path(config.store_dir).exists() and PartialState().is_main_process:
        log(f"removing the store of an earlier run at {config.store_dir}")
        shutil.rmtree(config.store_dir)
    PartialState().wait_for_everyone()
    set_seed(config.seed)
    model = make_model()
    theta_init = _flat(model)
    initial = copy.deepcopy(model)
    trainer = StudyTrainer(model=model, args=config, train_dataset=train_dataset)
    per_batch = _PerBatchRecorder(
        trainer, {k: set(v.tolist()) for k, v in planned.items()}, Path(config.output_dir) / "_per_batch"
    )
    trainer.add_callback(per_batch)
    began = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - began
    original = trainer.model
    theta_orig = _flat(original)
    num_params = theta_orig.numel()
    store_bytes = folder_bytes(config.store_dir)
    world = trainer.accelerator.num_processes
    per_step = config.per_device_train_batch_size * world * config.gradient_accumulation_steps
    log(f"trained with recording in {train_seconds:.1f}s; store {store_bytes / 2**20:.2f} MiB")

    def retrain(seed: int, retain_set) -> tuple[nn.Module, float]:
        set_seed(seed)
        fresh = make_model()
        args = AmnesiaConfig(
            **{**_init_fields(config), "seed": seed, "output_dir": os.path.join(config.output_dir, "_retrain")}
        )
        began = time.perf_counter()
        retrainer = AmnesiacTrainer(model=fresh, args=args, train_dataset=retain_set, record=False)
        retrainer.remove_callback(PrinterCallback)
        retrainer.train()
        return fresh, time.perf_counter() - began

    def forgetter(model: nn.Module) -> AmnesiacTrainer:
        return AmnesiacTrainer(model=model, args=config, train_dataset=train_dataset, eval_dataset=validation)

    def split(forget_ids: np.ndarray, scenario: str):
        in_forget = np.isin(train_ids, forget_ids)
        test_set = (
            test_dataset.select(np.flatnonzero(test_labels != study.forget_class))
            if scenario == "class"
            else test_dataset
        )
        return (
            train_dataset.select(np.flatnonzero(in_forget)),
            train_dataset.select(np.flatnonzero(~in_forget)),
            test_set,
        )

    def run_scenario(scenario: str) -> dict:
        forget_ids = planned[scenario]
        forget_set, retain_set, test_set = split(forget_ids, scenario)
        repair_steps = max(1, math.ceil(study.repair_epochs * len(retain_set) / per_step))

        def evaluate(candidate: nn.Module) -> dict[str, float]:
            return unlearning_metrics(candidate, forget_set, retain_set, test_set, label_column, seed=config.seed)

        rows: dict[str, dict] = {}
        gold, gold_seconds = retrain(config.seed, retain_set)
        theta_gold = _flat(gold)
        rows["retrain"] = {**evaluate(gold), "seconds": gold_seconds, "storage_bytes": 0}
        # the noise floor, and a second draw of it (does Retrain itself meet a target?)
        for name, offset in (("retrain_other_seed", 1), ("retrain_third_seed", 2)):
            if wanted(name):
                other, other_seconds = retrain(config.seed + offset, retain_set)
                rows[name] = {**evaluate(other), "seconds": other_seconds, "storage_bytes": 0, "_model": other}
        if wanted("original"):
            rows["original"] = {**evaluate(original), "seconds": 0.0, "storage_bytes": 0, "_model": original}

        def amnesia(patch=nullcontext, **kwargs):
            candidate = copy.deepcopy(original)
            began = time.perf_counter()
            with patch():
                report = forgetter(candidate).forget(forget_ids, **kwargs)
            return candidate, time.perf_counter() - began, report

        variants = [
            ("hf_amnesia", {}),
            ("hf_amnesia_exact", {"scale": 1.0, "repair_steps": 0}),
            ("hf_amnesia_exact+repair", {"scale": 1.0, "repair_steps": repair_steps}),
            ("hf_amnesia_auto_no_repair", {"repair_steps": 0}),
            ("hf_amnesia_auto+repair", {"repair_steps": repair_steps}),
            ("hf_amnesia_unweighted", {"patch": _unweighted_tensors}),
            ("hf_amnesia_plain_repair", {"patch": _plain_repair}),
            ("hf_amnesia_no_neighbours", {"patch": _no_neighbours}),
            ("hf_amnesia_probe_slack", {"patch": _probe_slack}),
            ("hf_amnesia_ceil10", {"patch": _ceiling_10}),
            ("hf_amnesia_ceil_memorised", {"patch": _ceiling_by_memorised}),
        ]
        for scale in [float(x) for x in study.extra_scales.split(",") if x.strip()]:
            variants += [
                (f"hf_amnesia_s{scale:g}", {"scale": scale, "repair_steps": 0}),
                (f"hf_amnesia_s{scale:g}+repair", {"scale": scale, "repair_steps": repair_steps}),
            ]
        for harm in [float(x) for x in study.extra_harms.split(",") if x.strip()]:
            variants.append((f"hf_amnesia_h{harm:g}", {"max_harm": harm}))
        for name, kwargs in variants:
            if not (wanted(name) or name.startswith(("hf_amnesia_s", "hf_amnesia_h"))):
                continue
            candidate, seconds, report = amnesia(**kwargs)
            rows[name] = {
                **evaluate(candidate),
                "seconds": seconds,
                "storage_bytes": store_bytes,
                "scale": report.scale,
                "repair_steps": report.repair_steps,
                "_model": candidate,
            }
        if wanted("hf_amnesia_norm"):
            candidate = copy.deepcopy(original)
            began = time.perf_counter()
            steps = _norm_rule_forget(forgetter(candidate), forget_ids, initial, len(train_ids))
            rows["hf_amnesia_norm"] = {
                **evaluate(candidate),
                "seconds": time.perf_counter() - began,
                "storage_bytes": store_bytes,
                "repair_steps": steps,
                "_model": candidate,
            }

        for name, match in (
            ("hf_amnesia_unseen", "mean"),
            ("hf_amnesia_quantile", "quantiles"),
            ("hf_amnesia_quantile_live", "live quantiles"),
            ("hf_amnesia_anchor", "anchor"),
        ):
            if not wanted(name):
                continue
            candidate = copy.deepcopy(original)
            began = time.perf_counter()
            scale, steps = _unseen_rule_forget(
                forgetter(candidate), forget_ids, forget_set, validation, label_column, config, match
            )
            rows[name] = {
                **evaluate(candidate),
                "seconds": time.perf_counter() - began,
                "storage_bytes": store_bytes,
                "scale": scale,
                "repair_steps": steps,
                "_model": candidate,
            }

        updates = per_batch.updates(scenario, num_params)
        keep = num_kept(config.keep_fraction or 0.01, num_params)
        for name, subset in [("per_batch", False), ("per_batch_subset", True)]:
            if not wanted(name):
                continue
            candidate = copy.deepcopy(original)
            began = time.perf_counter()
            total = torch.zeros(num_params)
            rng = np.random.default_rng(config.seed)
            for row in updates:
                row = torch.from_numpy(np.array(row))
                if subset:
                    mask = torch.zeros(num_params)
                    mask[torch.from_numpy(rng.choice(num_params, size=keep, replace=False))] = 1.0
                    row = row * mask
                total += row
            _set_flat(candidate, theta_orig - total)
            seconds = time.perf_counter() - began
            size = len(updates) * (keep if subset else num_params) * 4
            rows[name] = {**evaluate(candidate), "seconds": seconds, "storage_bytes": size, "_model": candidate}
            repaired = copy.deepcopy(candidate)
            began = time.perf_counter()
            finetune(repaired, retain_set, repair_steps, config)
            rows[name + "+repair"] = {
                **evaluate(repaired),
                "seconds": seconds + time.perf_counter() - began,
                "storage_bytes": size,
                "_model": repaired,
            }

        if wanted("finetune"):
            candidate = copy.deepcopy(original)
            began = time.perf_counter()
            finetune(candidate, retain_set, repair_steps, config)
            seconds = time.perf_counter() - began
            rows["finetune"] = {**evaluate(candidate), "seconds": seconds, "storage_bytes": 0, "_model": candidate}

        if wanted("neggrad"):
            candidate = copy.deepcopy(original)
            began = time.perf_counter()
            ascent_steps = max(1, math.ceil(len(forget_set) / per_step))
            finetune(candidate, forget_set, ascent_steps, config, trainer_class=_GradientAscent)
            seconds = time.perf_counter() - began
            rows["neggrad"] = {**evaluate(candidate), "seconds": seconds, "storage_bytes": 0, "_model": candidate}
            repaired = copy.deepcopy(candidate)
            began = time.perf_counter()
            finetune(repaired, retain_set, repair_steps, config)
            seconds += time.perf_counter() - began
            rows["neggrad+repair"] = {**evaluate(repaired), "seconds": seconds, "storage_bytes": 0, "_model": repaired}

        for name, row in rows.items():
            theta = _flat(row.pop("_model")) if "_model" in row else theta_gold
            row["avg_gap"] = avg_gap(row, rows["retrain"])
            row["dist_original"] = relative_distance(theta, theta_orig, theta_orig, theta_init)
            row["dist_retrain"] = relative_distance(theta, theta_gold, theta_orig, theta_init)
            if "repair_steps" not in row:
                row["repair_steps"] = repair_steps if name.endswith("+repair") or name == "finetune" else 0
        gaps = ", ".join(f"{m} {r['avg_gap']:.2f}" for m, r in rows.items() if m.startswith("hf_amnesia"))
        log(f"{scenario}: |F|={len(forget_ids)}, retrain {gold_seconds:.1f}s; Avg. Gap: {gaps}")
        return rows

    def run_sequence() -> dict:
        """Five requests one after another on one model, each a fifth of the canaries, with the
        defaults (and the ceiling candidates, each on a copy of its own, when named)."""
        variants = {"hf_amnesia": nullcontext}
        for name, patch in (("hf_amnesia_ceil10", _ceiling_10), ("hf_amnesia_ceil_memorised", _ceiling_by_memorised)):
            if wanted(name):
                variants[name] = patch
        candidates = {name: copy.deepcopy(original) for name in variants}
        servers = {name: forgetter(model_k) for name, model_k in candidates.items()}
        rows: dict[str, dict] = {}
        for step, request in enumerate(np.array_split(planned[SEQUENCE], 5), start=1):
            reports = {}
            for name, patch in variants.items():
                began = time.perf_counter()
                with patch():
                    reports[name] = (servers[name].forget(request), time.perf_counter() - began)
            forget_set, retain_set, test_set = split(np.concatenate(np.array_split(planned[SEQUENCE], 5)[:step]), "")
            gold, _ = retrain(config.seed, retain_set)
            measured = {}
            for name, model_k in (("retrain", gold), ("original", original), *candidates.items()):
                measured[name] = unlearning_metrics(
                    model_k, forget_set, retain_set, test_set, label_column, seed=config.seed
                )
            for name, values in measured.items():
                rows[f"{name}@{step}"] = {**values, "avg_gap": avg_gap(values, measured["retrain"])}
            for name, (report, seconds) in reports.items():
                rows[f"{name}@{step}"].update(seconds=seconds, scale=report.scale, repair_steps=report.repair_steps)
            log(f"{SEQUENCE}: request {step}: Avg. Gap {rows[f'hf_amnesia@{step}']['avg_gap']:.2f}")
        return rows

    results = {scenario: run_sequence() if scenario == SEQUENCE else run_scenario(scenario) for scenario in scenarios}
    meta = {
        "train_seconds": train_seconds,
        "num_params": num_params,
        "world_size": world,
        "num_train": len(train_dataset),
        "num_validation": 0 if validation is None else len(validation),
        "num_test": len(test_dataset),
        "seed": config.seed,
        "keep_fraction": config.keep_fraction or 0.01,
        "store_bytes": store_bytes,
    }
    return results, meta


@contextmanager
def _unweighted_tensors():
    """forget's automatic choice on the raw stored sums, every tensor weighted 1 (the rule before
    `kept_share_weights`), for comparison."""
    saved = amnesia_trainer.kept_share_weights
    amnesia_trainer.kept_share_weights = lambda manifest: torch.ones(manifest.num_params, dtype=torch.float64)
    try:
        yield
    finally:
        amnesia_trainer.kept_share_weights = saved


@contextmanager
def _plain_repair():
    """forget's automatic choice with a repair on the retained rows alone (the rule before the
    repair held forget rows unseen), for comparison."""
    saved = AmnesiacTrainer._prepare_unseen_hold
    AmnesiacTrainer._prepare_unseen_hold = lambda self, auto, todo: None
    try:
        yield
    finally:
        AmnesiacTrainer._prepare_unseen_hold = saved


@contextmanager
def _no_neighbours():
    """forget's defaults, but the repair holds no forget row at a misclassified row's loss (the rule
    before `unsupported_by_neighbours`), for comparison."""
    saved = amnesia_trainer.unsupported_by_neighbours
    amnesia_trainer.unsupported_by_neighbours = lambda features, labels, *rest: np.zeros(len(labels), dtype=bool)
    try:
        yield
    finally:
        amnesia_trainer.unsupported_by_neighbours = saved


@contextmanager
def _ceiling_10():
    """forget's defaults with the scale search's ceiling at 1 / sqrt(p) instead of 4 / sqrt(p): the
    norm of the request's whole change (`calibrate.scale_ceiling`), a candidate."""
    saved = amnesia_trainer.scale_ceiling
    amnesia_trainer.scale_ceiling = _whole_change_ceiling
    try:
        yield
    finally:
        amnesia_trainer.scale_ceiling = saved


def _whole_change_ceiling(keep_fraction: float) -> float:
    """1 / sqrt(p): the scale at which the kept entries carry the norm of the request's whole change."""
    return 1.0 / math.sqrt(keep_fraction)


@contextmanager
def _ceiling_by_memorised():
    """A candidate: the ceiling at 1 / sqrt(p), unless at least half of the request's rows are flagged
    by the neighbour check (memorised rows, whose retained neighbours outvote their label): then
    the default 4 / sqrt(p)."""
    choose, default = AmnesiacTrainer._choose_scale, amnesia_trainer.scale_ceiling

    def choose_with_ceiling(self, params, snapshot, update, auto, max_harm, keep_fraction):
        flags = auto.unsupported
        memorised = flags is not None and len(flags) > 0 and float(np.mean(flags)) >= 0.5
        amnesia_trainer.scale_ceiling = default if memorised else _whole_change_ceiling
        try:
            return choose(self, params, snapshot, update, auto, max_harm, keep_fraction)
        finally:
            amnesia_trainer.scale_ceiling = default

    AmnesiacTrainer._choose_scale = choose_with_ceiling
    try:
        yield
    finally:
        AmnesiacTrainer._choose_scale = choose


@contextmanager
def _probe_slack():
    """forget's defaults, but the repair is done once retained accuracy reaches what the same
    repair budget of fine-tuning reaches from the original weights, if that is below the
    original's own accuracy (a fresh optimizer alone can cost more than the one-row slack).
    A candidate, for comparison: one extra repair budget of steps per request."""
    saved = AmnesiacTrainer._prepare_unseen_hold

    def prepare_and_probe(self, auto, todo):
        saved(self, auto, todo)
        probe = copy.deepcopy(self.model)
        finetune(probe, auto.retained, repair_budget(auto.planned_steps), self.args, data_collator=self.data_collator)
        measure = AmnesiacTrainer(model=probe, args=self.args, train_dataset=auto.retained, record=False)
        auto.original_accuracy = min(auto.original_accuracy, measure._accuracy(auto.retained_sample))

    AmnesiacTrainer._prepare_unseen_hold = prepare_and_probe
    try:
        yield
    finally:
        AmnesiacTrainer._prepare_unseen_hold = saved


def _norm_rule_forget(trainer: AmnesiacTrainer, forget_ids: np.ndarray, initial: nn.Module, num_train: int) -> int:
    """The per-tensor closed form `s_l = (|F| / N) * ||theta_T,l - theta_0,l|| / ||u_l||`, then the automatic repair.

    A candidate rule for comparison: it needs the initial weights, which the store does not keep.
    """
    auto = trainer._auto_data(forget_ids, None, None, need_holdout=False)
    auto.original_accuracy = trainer._accuracy(auto.retained_sample)
    update = forget_update(StoreReader(trainer.args.store_dir), forget_ids)
    layout = ParamLayout.from_model(trainer.model)
    starts = dict(initial.named_parameters())
    offset = 0
    with torch.no_grad():
        for name, param in zip(layout.names, layout.params_of(trainer.model)):
            piece = update[offset : offset + param.numel()].view(param.shape).to(param.dtype)
            offset += param.numel()
            norm = float(piece.norm())
            if norm > 0:
                change = float((param - starts[name]).norm())
                param.sub_(len(forget_ids) / num_train * change / norm * piece)
    trainer._set_forgotten(sorted(set(trainer.forgotten_ids()) | set(forget_ids.tolist())))
    return trainer._repair_until_restored(auto)[0]


def _row_losses(model: nn.Module, dataset, label_column: str) -> np.ndarray:
    return -np.log(
        np.clip(true_label_confidence(*predict_proba(model, dataset, label_column=label_column)), 1e-12, None)
    )


def _unseen_rule_forget(
    trainer: AmnesiacTrainer, forget_ids: np.ndarray, forget_set, holdout, label_column: str, config, match: str
) -> tuple[float, int]:
    """The automatic scale; then, unless a whole class goes, a repair that keeps the forget rows
    looking unseen (Retrain never saw them, so they should fit no better than held-out rows).
    The repair's loss is the retained rows' loss plus, on a batch of forget rows:
    - match="mean": relu(target - their mean loss), target = the original's mean held-out loss;
    - match="quantiles": the mean of relu(h_q - loss) over the batch, each row's h_q being the
      original's held-out loss at that row's quantile within the batch (1-D quantile matching:
      only rows fitting better than their held-out counterpart are pushed, and only up to it);
    - match="live quantiles": the same with the held-out losses of the model being repaired,
      measured again every LIVE_REFRESH steps;
    - match="anchor": the mean of relu(a_i - loss_i), a_i being row i's loss right after the
      subtraction (the repair may not fit a forget row better than the subtraction left it);
      forget's own repair takes min(a_i, h_q) (`calibrate.unseen_targets`).
    Candidate rules for comparison; returns (scale, repair steps)."""
    from torch.utils.data import DataLoader

    auto = trainer._auto_data(forget_ids, None, None, need_holdout=False)
    auto.original_accuracy = trainer._accuracy(auto.retained_sample)
    model = trainer.model
    held_out = np.sort(_row_losses(model, holdout, label_column))
    report = trainer.forget(forget_ids, repair_steps=0)
    if auto.classes:
        return report.scale, trainer._repair_until_restored(auto)[0]
    id_column = config.id_column
    anchors = {}  # match="anchor": each forget row's loss right after the subtraction
    if match == "anchor":
        anchors = dict(
            zip(np.asarray(forget_set[id_column]).tolist(), _row_losses(model, forget_set, label_column).tolist())
        )
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(forget_set, batch_size=config.per_device_train_batch_size, shuffle=True, generator=generator)

    def forget_batches():
        while True:
            yield from loader

    batches = forget_batches()
    calls = 0

    def gap(losses: torch.Tensor, ids) -> torch.Tensor:
        nonlocal held_out, calls
        if match == "live quantiles" and calls % LIVE_REFRESH == 0:
            with torch.no_grad():
                held_out = np.sort(_row_losses(model, holdout, label_column))
        calls += 1
        if match == "mean":
            return torch.relu(float(held_out.mean()) - losses.mean())
        ranks = torch.argsort(torch.argsort(losses.detach())).cpu().numpy()
        targets = np.quantile(held_out, (ranks + 0.5) / len(ranks))
        if match == "anchor":
            targets = np.array([anchors[int(i)] for i in ids])
        return torch.relu(torch.as_tensor(targets, dtype=losses.dtype, device=losses.device) - losses).mean()

    class KeepingUnseen(AmnesiacTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
            batch = next(batches)
            ids = batch[id_column].tolist()
            batch = {k: v.to(loss.device) for k, v in batch.items() if k != id_column}
            labels = batch.pop(label_column)
            logits = model(**batch)["logits"]
            return loss + gap(nn.functional.cross_entropy(logits, labels, reduction="none"), ids)

    return report.scale, trainer._repair_until_restored(auto, trainer_class=KeepingUnseen)[0]


def _init_fields(config: AmnesiaConfig) -> dict:
    import dataclasses

    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    values.update(save_strategy="no", report_to=[], push_to_hub=False)
    return values


def write_outputs(results: dict, meta: dict, output_dir: str) -> str:
    """results.json, run.json, results.md and results.png in output_dir; returns the markdown table."""
    os.makedirs(output_dir, exist_ok=True)
    table = markdown_table(results)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(output_dir, "run.json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    plot_results(results, os.path.join(output_dir, "results.png"))
    return table

"""The unlearning study shared by the recipes.

Train once with recording; then, for each scenario (`class`, `random_10`, `random_1`, `canary_1`,
`sequence_5`), apply every method to a copy of the trained model, evaluate it next to Retrain, and collect
results[scenario][method][metric]. Methods and what each stores are described in
docs/evaluation.md. Every process of a multi-process run computes the same numbers; the main
process writes them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from accelerate import PartialState
from torch import nn
from transformers import PrinterCallback, set_seed

from hf_amnesia import AmnesiaConfig, AmnesiacTrainer, ForgetConfig
from hf_amnesia.forgetting import finetune
from hf_amnesia.store import folder_bytes, num_kept
from recipes.baselines import (
    PerBatchRecorder,
    StudyTrainer,
    flat,
    negated_cross_entropy,
    norm_rule_forget,
    per_batch_forget,
)
from recipes.evaluation import (
    avg_gap,
    avg_gap_robust,
    relative_distance,
    unlearning_metrics,
)
from recipes.scenarios import SCENARIOS, SEQUENCE, plan_forget_sets, plant_canaries, split_validation

# Run only when named in --methods (not in `all`): the ablations and candidates, each a ForgetConfig
# that turns parts of the policy off or changes its criterion (or a fixed repair), and a third Retrain.
RESEARCH_METHODS = (
    "retrain_third_seed",
    "hf_amnesia_unweighted",
    "hf_amnesia_plain_repair",
    "hf_amnesia_auto+repair",
    "hf_amnesia_no_neighbours",
    "hf_amnesia_accuracy_stop",
    "hf_amnesia_no_retries",
    "hf_amnesia_loss",
)
# What --methods may name (retrain always runs; a `+repair` variant runs with its method).
METHODS = (
    "original",
    "retrain_other_seed",
    "hf_amnesia",
    "hold_only",
    "hf_amnesia_deleted",
    "hf_amnesia_exact",
    "hf_amnesia_exact+repair",
    "hf_amnesia_auto_no_repair",
    "hf_amnesia_norm",
    "per_batch",
    "per_batch_subset",
    "finetune",
    "neggrad",
    *RESEARCH_METHODS,
)
# `hold_only`: forget's repair with nothing subtracted, each forget row held at the original's held-out
# loss of its rank (no cap by the subtraction): what the policy does without a store.
HOLD_ONLY = {"scale": 0.0, "config": ForgetConfig(hold_cap=False)}


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
    canary_copies: int = field(
        default=8,
        metadata={
            "help": "Each canary (`canary_1`, `sequence_5`) is trained on as this many copies, each with its own id, "
            "so that the original memorises it (1: the canary alone); the request forgets them all."
        },
    )
    extra_scales: str = field(
        default="",
        metadata={"help": "Also run forget at these scales, with and without repair (`hf_amnesia_s{scale}`)."},
    )
    extra_harms: str = field(
        default="",
        metadata={"help": "Also run forget's automatic choice with these max_harm values (`hf_amnesia_h{value}`)."},
    )


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
    unknown = sorted(chosen - {"all", "retrain", *METHODS})
    if unknown:
        raise ValueError(
            f"--methods names {unknown}, which the study does not run; choose from all, {', '.join(METHODS)} "
            "(hf_amnesia_s*/_h* rows come from --extra_scales/--extra_harms; +repair rows run with their method)."
        )

    def wanted(method: str) -> bool:
        return method in chosen or ("all" in chosen and method not in RESEARCH_METHODS)

    id_column = config.id_column
    if id_column not in train_dataset.column_names:
        train_dataset = train_dataset.add_column(id_column, np.arange(len(train_dataset), dtype=np.int64))
    train_dataset, validation = split_validation(train_dataset, study.validation_fraction, config.seed)
    canaries = None  # [canary, copy] ids
    if "canary_1" in scenarios or SEQUENCE in scenarios:
        held = [] if validation is None else np.asarray(validation[id_column])
        next_id = int(np.max(np.concatenate([np.asarray(train_dataset[id_column]), held]))) + 1  # ids stay unique
        train_dataset, rows = plant_canaries(
            train_dataset, label_column, 0.01, config.seed, study.canary_copies, id_column, next_id
        )
        canaries = np.asarray(train_dataset[id_column], dtype=np.int64)[rows]
        canaries = canaries[np.argsort(canaries[:, 0])]
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
    theta_init = flat(model)
    initial = copy.deepcopy(model)
    trainer = StudyTrainer(model=model, args=config, train_dataset=train_dataset)
    per_batch = PerBatchRecorder(
        trainer, {k: set(v.tolist()) for k, v in planned.items()}, Path(config.output_dir) / "_per_batch"
    )
    trainer.add_callback(per_batch)
    began = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - began
    original = trainer.model
    theta_orig = flat(original)
    num_params = theta_orig.numel()
    store_bytes = folder_bytes(config.store_dir)
    world = trainer.accelerator.num_processes
    per_step = config.per_device_train_batch_size * world * config.gradient_accumulation_steps
    log(f"trained with recording in {train_seconds:.1f}s; store {store_bytes / 2**20:.2f} MiB")

    def retrain(seed: int, retain_set) -> tuple[nn.Module, float]:
        set_seed(seed)
        fresh = make_model()
        args = dataclasses.replace(
            config,
            seed=seed,
            output_dir=os.path.join(config.output_dir, "_retrain"),
            save_strategy="no",
            report_to=[],
            push_to_hub=False,
        )
        began = time.perf_counter()
        retrainer = AmnesiacTrainer(model=fresh, args=args, train_dataset=retain_set, record=False)
        retrainer.remove_callback(PrinterCallback)
        retrainer.train()
        return fresh, time.perf_counter() - began

    def forgetter(model: nn.Module, train_rows=None) -> AmnesiacTrainer:
        """A trainer that serves forget on `train_rows`: every training row by default, the retained rows
        alone for hf_amnesia_deleted (the user deleted the forgotten rows)."""
        rows = train_dataset if train_rows is None else train_rows
        return AmnesiacTrainer(model=model, args=config, train_dataset=rows, eval_dataset=validation)

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
        theta_gold = flat(gold)
        rows["retrain"] = {**evaluate(gold), "seconds": gold_seconds, "storage_bytes": 0}
        # the noise floor, and a second draw of it (does Retrain itself meet a target?)
        for name, offset in (("retrain_other_seed", 1), ("retrain_third_seed", 2)):
            if wanted(name):
                other, other_seconds = retrain(config.seed + offset, retain_set)
                rows[name] = {**evaluate(other), "seconds": other_seconds, "storage_bytes": 0, "_model": other}
        if wanted("original"):
            rows["original"] = {**evaluate(original), "seconds": 0.0, "storage_bytes": 0, "_model": original}

        def amnesia(train_rows=None, **kwargs):
            candidate = copy.deepcopy(original)
            began = time.perf_counter()
            report = forgetter(candidate, train_rows).forget(forget_ids, **kwargs)
            return candidate, time.perf_counter() - began, report

        variants = [
            ("hf_amnesia", {}),
            ("hold_only", HOLD_ONLY),
            ("hf_amnesia_deleted", {}),
            ("hf_amnesia_exact", {"scale": 1.0, "repair_steps": 0}),
            ("hf_amnesia_exact+repair", {"scale": 1.0, "repair_steps": repair_steps}),
            ("hf_amnesia_auto_no_repair", {"repair_steps": 0}),
            ("hf_amnesia_auto+repair", {"repair_steps": repair_steps}),
            ("hf_amnesia_unweighted", {"config": ForgetConfig(weight_by_kept_share=False)}),
            ("hf_amnesia_plain_repair", {"config": ForgetConfig(hold_unseen=False)}),
            ("hf_amnesia_no_neighbours", {"config": ForgetConfig(neighbour_vote=False)}),
            ("hf_amnesia_accuracy_stop", {"config": ForgetConfig(hold_until_met=False)}),
            ("hf_amnesia_no_retries", {"config": ForgetConfig(harm_retries=0, class_retries=0)}),
            ("hf_amnesia_loss", {"config": ForgetConfig(criterion="loss")}),
        ]
        for scale in [float(x) for x in study.extra_scales.split(",") if x.strip()]:
            variants += [
                (f"hf_amnesia_s{scale:g}", {"scale": scale, "repair_steps": 0}),
                (f"hf_amnesia_s{scale:g}+repair", {"scale": scale, "repair_steps": repair_steps}),
            ]
        for harm in [float(x) for x in study.extra_harms.split(",") if x.strip()]:
            variants.append((f"hf_amnesia_h{harm:g}", {"config": ForgetConfig(max_harm=harm)}))
        for name, kwargs in variants:
            if not (wanted(name) or name.startswith(("hf_amnesia_s", "hf_amnesia_h"))):
                continue
            candidate, seconds, report = amnesia(retain_set if name == "hf_amnesia_deleted" else None, **kwargs)
            rows[name] = {
                **evaluate(candidate),
                "seconds": seconds,
                "storage_bytes": 0 if name == "hold_only" else store_bytes,
                "scale": report.scale,
                "repair_steps": report.repair_steps,
                "_model": candidate,
            }
        if wanted("hf_amnesia_norm"):
            candidate = copy.deepcopy(original)
            began = time.perf_counter()
            steps = norm_rule_forget(forgetter(candidate), forget_ids, initial, len(train_ids))
            rows["hf_amnesia_norm"] = {
                **evaluate(candidate),
                "seconds": time.perf_counter() - began,
                "storage_bytes": store_bytes,
                "repair_steps": steps,
                "_model": candidate,
            }

        updates = per_batch.updates(scenario, num_params)
        keep = num_kept(config.keep_fraction or 0.01, num_params)
        for name, subset in [("per_batch", False), ("per_batch_subset", True)]:
            if not wanted(name):
                continue
            candidate, seconds, size = per_batch_forget(original, updates, theta_orig, keep, config.seed, subset)
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
            finetune(candidate, forget_set, ascent_steps, config, compute_loss_func=negated_cross_entropy)
            seconds = time.perf_counter() - began
            rows["neggrad"] = {**evaluate(candidate), "seconds": seconds, "storage_bytes": 0, "_model": candidate}
            repaired = copy.deepcopy(candidate)
            began = time.perf_counter()
            finetune(repaired, retain_set, repair_steps, config)
            seconds += time.perf_counter() - began
            rows["neggrad+repair"] = {**evaluate(repaired), "seconds": seconds, "storage_bytes": 0, "_model": repaired}

        for name, row in rows.items():
            theta = flat(row.pop("_model")) if "_model" in row else theta_gold
            row["avg_gap"] = avg_gap(row, rows["retrain"])
            row["avg_gap_robust"] = avg_gap_robust(row, rows["retrain"])
            row["dist_original"] = relative_distance(theta, theta_orig, theta_orig, theta_init)
            row["dist_retrain"] = relative_distance(theta, theta_gold, theta_orig, theta_init)
            if "repair_steps" not in row:
                row["repair_steps"] = repair_steps if name.endswith("+repair") or name == "finetune" else 0
        gaps = ", ".join(f"{m} {r['avg_gap']:.2f}" for m, r in rows.items() if m.startswith("hf_amnesia"))
        log(f"{scenario}: |F|={len(forget_ids)}, retrain {gold_seconds:.1f}s; Avg. Gap: {gaps}")
        return rows

    def run_sequence() -> dict:
        """Five requests one after another on one model, each a fifth of the canaries (one each when there
        are fewer than five), with the defaults
        (hf_amnesia_deleted: on the rows left after every request so far was deleted)."""
        names = ["hf_amnesia", *(m for m in ("hold_only", "hf_amnesia_deleted") if wanted(m))]
        candidates = {name: copy.deepcopy(original) for name in names}
        servers = {name: forgetter(model_k) for name, model_k in candidates.items() if name != "hf_amnesia_deleted"}
        # a canary's copies in one request; fewer than five requests when there are fewer canaries (none empty)
        requests = [part.ravel() for part in np.array_split(canaries, min(5, len(canaries)))]
        rows: dict[str, dict] = {}
        for step, request in enumerate(requests, start=1):
            forget_set, retain_set, test_set = split(np.concatenate(requests[:step]), "")
            reports = {}
            for name, model_k in candidates.items():
                server = forgetter(model_k, retain_set) if name == "hf_amnesia_deleted" else servers[name]
                began = time.perf_counter()
                report = server.forget(request, **(HOLD_ONLY if name == "hold_only" else {}))
                reports[name] = (report, time.perf_counter() - began)
            gold, _ = retrain(config.seed, retain_set)
            measured = {}
            for name, model_k in (("retrain", gold), ("original", original), *candidates.items()):
                measured[name] = unlearning_metrics(
                    model_k, forget_set, retain_set, test_set, label_column, seed=config.seed
                )
            for name, values in measured.items():
                rows[f"{name}@{step}"] = {
                    **values,
                    "avg_gap": avg_gap(values, measured["retrain"]),
                    "avg_gap_robust": avg_gap_robust(values, measured["retrain"]),
                }
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

"""Shared setup of the adversarial reliability suite (`tests/test_adversarial_k*.py`).

Each case attacks a copy of one tiny BERT run (trained once per test process, keep_fraction 0.1,
float32: `pristine()`), through the API or the `hf-amnesia` CLI run in-process (`cli`), and
checks one of two outcomes:

- refused: the right `hf_amnesia.errors` class or CLI exit code, and every file of the case (the
  saved model and the store; `.lock` aside) byte-identical afterwards (`hashes`);
- served: the model equals a clean forget of the same ids on a pristine copy within 1e-6
  (`assert_model_equals_clean_forget`) and the audit log holds exactly one new record.

`PROMISES` maps each kind of attack to its promise and the tests that pin it (docs/reliability.md
cites it; `test_adversarial_table.py` checks that it names every case).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from tiny import text_dataset, tiny_bert, tiny_config

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-6
IDS = [2, 5, 11]  # the ids most cases forget; the store holds 0..15

PROMISES = {
    1: (
        "A model of another run (another seed, the initial weights, a perturbed weight, another store's "
        "model, a model saved before training further) is refused before anything changes: ModelLineageError "
        "from the API, exit 2 from the CLI. The README flow keeps working.",
        [
            "test_k1_cli_refuses_model_of_another_run",
            "test_k1_api_refuses_model_of_another_run",
            "test_k1_right_model_served_after_a_refused_one",
            "test_k1_readme_flow_in_memory_then_save_then_new_trainer",
            "test_k1_five_forgets_in_a_row_in_memory",
            "test_k1_cli_forget_then_cli_forget_again",
            "test_k1_model_saved_by_a_committed_forget_served",
        ],
    ),
    2: (
        "Damaged metadata (ids, sums, manifest, shard state, journal, audit line, store key, lineage) is "
        "refused with StoreError before any change, and `hf-amnesia verify` exits 2 naming the damage; a "
        "store of format version 1 is refused with a message that mentions `hf-amnesia migrate`.",
        [
            "test_k2_flipped_ids_byte",
            "test_k2_flipped_ids_byte_verify",
            "test_k2_metadata_edit_refused",
            "test_k2_metadata_edit_verify",
            "test_k2_sums_byte_of_the_requested_id",
            "test_k2_edited_journal_refused",
            "test_k2_edited_log_line_refused",
            "test_k2_store_key_refused",
            "test_k2_format_version_1_refused",
        ],
    ),
    3: (
        "A torn last audit line moves to audit.jsonl.torn with a warning and the forget is served; a damaged "
        "line elsewhere refuses a forget with save_to before any change while `hf-amnesia audit` prints the "
        "readable records; short writes are continued.",
        [
            "test_k3_torn_tail_served",
            "test_k3_damaged_line_api_refused",
            "test_k3_damaged_line_cli_refused",
            "test_k3_damaged_line_audit_still_reads",
            "test_k3_short_writes_continued",
        ],
    ),
    4: (
        "A forget interrupted at any of its points (forget:staged, forget:committed, swap, purge) is finished "
        "by `hf-amnesia recover`, by the next `hf-amnesia forget` or by the API's recover, and the model then "
        "equals the clean forget; a missing model folder without a journal exits 2 without naming the Hub.",
        [
            "test_k4_interrupted_forget_recovered",
            "test_k4_killed_in_swap_then_cli_forget",
            "test_k4_killed_after_commit_then_cli_recover",
            "test_k4_missing_model_folder_without_journal",
            "test_k4_recover_on_a_store_with_nothing_to_do",
        ],
    ),
    5: (
        "Resuming from a checkpoint taken before a committed forget, from another run's checkpoint, or "
        "training on a store whose newest generation is missing, is refused up front with StoreError, store "
        "files unchanged.",
        [
            "test_k5_resume_from_checkpoint_before_a_forget",
            "test_k5_resume_interrupted_store_from_another_runs_checkpoint",
            "test_k5_resume_from_checkpoint_without_recorder_state",
            "test_k5_resume_a_finished_run",
            "test_k5_missing_newest_generation_refused_up_front",
            "test_k5_new_run_of_another_model_into_the_store",
        ],
    ),
    6: (
        "A forget from another model of ids this store already purged reports them in purged_elsewhere (CLI "
        "JSON key, exit 4, served in part); with strict it is refused with nothing changed. Training holds "
        "the store lock.",
        [
            "test_k6_overlapping_save_to_cli_served_in_part",
            "test_k6_overlapping_save_to_cli_strict_refused",
            "test_k6_overlapping_save_to_api_purged_elsewhere",
            "test_k6_overlapping_save_to_api_strict_refused",
            "test_k6_overlapping_after_no_purge_served",
            "test_k6_training_holds_the_store_lock",
        ],
    ),
    7: (
        "The CLI takes plain decimal digits only (exit 2, the message names the token); unreadable ids files "
        "exit 2; the API refuses every malformed id collection with ForgetRequestError naming the culprit; an "
        "empty request changes nothing; duplicates collapse.",
        [
            "test_k7_cli_refuses_token",
            "test_k7_cli_refuses_ids_file",
            "test_k7_cli_no_ids",
            "test_k7_api_refuses_malformed_ids",
            "test_k7_mixed_list_names_the_culprit",
            "test_k7_empty_request_changes_nothing",
            "test_k7_duplicates_collapse",
            "test_k7_cli_commas_and_newlines_served",
        ],
    ),
    8: (
        "CLI exit codes: 0 served, 2 refused with nothing changed, 3 committed but not finished (stderr says "
        "to run `hf-amnesia recover STORE`; the API raises ForgetIncompleteError), 4 served in part; never a "
        "traceback; any damaged store file gives StoreError.",
        [
            "test_k8_full_disk_before_commit_cli",
            "test_k8_full_disk_before_commit_api",
            "test_k8_full_disk_after_commit_cli",
            "test_k8_full_disk_after_commit_api",
            "test_k8_damaged_store_file_refused",
            "test_k8_damaged_store_file_verify",
            "test_k8_not_a_store",
        ],
    ),
    9: (
        "No audit field lets one test a guessed id set without the store's key; the saved config holds a "
        "count of forgotten ids, not the ids; the old plain list is still read and converted on the next "
        "save; no store file is written through a planted symlink.",
        [
            "test_k9_audit_digest_is_keyed",
            "test_k9_audit_digest_changes_with_the_key",
            "test_k9_config_holds_no_forgotten_ids",
            "test_k9_old_forgotten_ids_list_still_read",
            "test_k9_old_forgotten_ids_list_converted_on_next_save",
            "test_k9_planted_symlink_not_followed",
        ],
    ),
    10: (
        "A PEFT (LoRA) model keeps its forgotten-id record through save_model and from_pretrained (a second "
        "forget reports already_forgotten and changes nothing); the CLI loads a base model plus adapter.",
        [
            "test_k10_adapter_record_survives_save_and_reload",
            "test_k10_cli_adapter",
            "test_k10_cli_adapter_forget_twice",
        ],
    ),
    11: (
        "Over a store's life: a refused run changes nothing; a run that fails at its first step leaves the "
        "weights it started from served; earlier forgets, and ids purged for a sibling model, are remembered "
        "across further runs (never trained on again, reported, left out of repairs); a sibling's request does "
        "not move the weights the store may train further; a run finishes an interrupted forget first; the CLI "
        "neither locks nor audits a folder that is not a store.",
        [
            "test_k11_a_refused_run_on_forgotten_rows_changes_nothing",
            "test_k11_a_run_that_fails_at_its_first_step_leaves_its_start_served",
            "test_k11_forgotten_ids_survive_a_further_run",
            "test_k11_a_sibling_request_does_not_move_the_trainable_model",
            "test_k11_purged_elsewhere_survives_a_further_run",
            "test_k11_training_finishes_an_interrupted_forget_first",
            "test_k11_cli_on_a_folder_that_is_not_a_store",
        ],
    ),
}


# -- the pristine run ------------------------------------------------------------------------------


def _scratch(name: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"hf_amnesia_{name}_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def train_run(root: Path, *, seed: int = 0, data_seed: int = 0, **overrides) -> Path:
    """Train tiny BERT (init seed `seed`) on `text_dataset(16, seed=data_seed)` into
    `root/run/_amnesia_store` and save it to `root/model`; returns `root`."""
    args = tiny_config(
        root / "run",
        keep_fraction=0.1,
        num_train_epochs=2,
        learning_rate=5e-3,
        store_dtype="float32",
        **overrides,
    )
    model = tiny_bert(seed=seed)
    from hf_amnesia import AmnesiacTrainer

    AmnesiacTrainer(model=model, args=args, train_dataset=text_dataset(16, seed=data_seed)).train()
    model.save_pretrained(str(root / "model"))
    return root


@functools.cache
def pristine() -> Path:
    """The run every case copies (trained once per process): `model/` and `run/_amnesia_store/`."""
    return train_run(_scratch("pristine"))


@functools.cache
def other_run(seed: int, data_seed: int) -> Path:
    """Another run of the same architecture (its own store)."""
    return train_run(_scratch(f"other_{seed}_{data_seed}"), seed=seed, data_seed=data_seed)


@dataclass
class Case:
    """A copy of a run: `root` holds `model/` and `run/_amnesia_store/`; `out` is scratch space
    outside it (trainer output folders, ids files)."""

    root: Path
    out: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def store(self) -> Path:
        return self.root / "run" / "_amnesia_store"


def copy_case(tmp_path: Path, source: Path | None = None) -> Case:
    root = tmp_path / "case"
    shutil.copytree(source or pristine(), root, symlinks=True)
    out = tmp_path / "out"
    out.mkdir()
    return Case(root, out)


# -- models and the clean forget -------------------------------------------------------------------


def load(model_dir):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(str(model_dir))


def trainer_for(model, store, out):
    """An AmnesiacTrainer that serves forget requests from `store` (no data, as in a new process)."""
    from hf_amnesia import AmnesiaConfig, AmnesiacTrainer

    args = AmnesiaConfig(output_dir=str(out), store_dir=str(store), report_to=[], use_cpu=True)
    return AmnesiacTrainer(model=model, args=args)


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@functools.cache
def _clean_forget(ids: tuple[int, ...]) -> dict[str, torch.Tensor]:
    work = _scratch("clean")
    shutil.copytree(pristine(), work / "case")
    model = load(work / "case" / "model")
    trainer_for(model, work / "case" / "run" / "_amnesia_store", work / "out").forget(
        list(ids), scale=1.0, repair_steps=0
    )
    return params(model)


def clean_forget(ids) -> dict[str, torch.Tensor]:
    """The parameters of the pristine model after the exact forget of `ids` (in memory, on a copy)."""
    return _clean_forget(tuple(sorted(set(int(i) for i in ids))))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_model_equals_clean_forget(model_or_dir, ids) -> None:
    model = load(model_or_dir) if isinstance(model_or_dir, (str, os.PathLike)) else model_or_dir
    worst = max_diff(params(model), clean_forget(ids))
    assert worst <= TOL, f"the model differs from the clean forget of {sorted(ids)} by {worst}"


def assert_model_is_pristine(model_dir) -> None:
    assert max_diff(params(load(model_dir)), params(load(pristine() / "model"))) == 0.0


# -- files -----------------------------------------------------------------------------------------


def hashes(*folders: Path) -> dict[str, str]:
    """sha256 of every file under `folders` (the `.lock` aside), and the folders that are missing."""
    out = {}
    for folder in folders:
        if not folder.exists():
            out[str(folder)] = "missing"
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_symlink():
                out[str(path)] = "link -> " + os.readlink(path)
            elif path.is_file() and path.name != ".lock":
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def audit_records(store: Path) -> list[dict]:
    from hf_amnesia.store.audit import load_audit

    return load_audit(store).records


def edit_json(path: Path, change) -> None:
    """Rewrite a JSON file after `change(data)` edited it in place (what a careless operator does)."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def shard_file(store: Path, suffix: str) -> Path:
    """The current generation's file of shard 0 ending with `suffix` (`ids.npy`, `rows`, `sums.npy`)."""
    (found,) = sorted(store.glob(f"shard-00000.g*.{suffix}"))
    return found


# -- the CLI and subprocesses ----------------------------------------------------------------------


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out.strip().splitlines()[-1])


def cli(capsys, *argv) -> Result:
    """`hf-amnesia ARGV` in this process, with the exit code and streams a real process would give:
    `SystemExit("message")` exits 1 with the message on stderr, an uncaught exception exits 1 with
    its traceback."""
    from hf_amnesia.cli import main

    capsys.readouterr()
    extra = ""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            code, extra = 1, f"{stop.code}\n"
    except Exception:  # what the interpreter prints for an uncaught exception
        code, extra = 1, traceback.format_exc()
    streams = capsys.readouterr()
    return Result(code, streams.out, streams.err + extra)


def forget_argv(case: Case, *ids, model=None, extra=()) -> list[str]:
    return [
        "forget",
        "--model",
        str(model or case.model),
        "--store",
        str(case.store),
        "--ids",
        *map(str, ids),
        *extra,
    ]


def run_python(args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """A Python subprocess that imports this checkout of hf_amnesia."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            **(env or {}),
        },
    )


def fail_at(monkeypatch, point: str) -> None:
    """`HF_AMNESIA_FAIL_AT=point` for this test, counting passages from zero."""
    from hf_amnesia import faults

    monkeypatch.setattr(faults, "_passes", {})
    monkeypatch.setenv(faults.FAIL_ENV, point)


def write_format_1_store(store: Path, model) -> None:
    """A store as hf_amnesia 0.2.0 wrote it (format version 1: no key, no lineage, no metadata
    checksums) for `model`'s trainable parameters: 16 rows of random values with their CRC-32."""
    import math
    import zlib

    import numpy as np

    from hf_amnesia.layout import ParamLayout
    from hf_amnesia.store.journal import weights_fingerprint

    layout = ParamLayout.from_model(model)
    k = math.ceil(0.1 * layout.num_params - 1e-9)
    manifest = {
        "format_version": 1,
        "library_version": "0.2.0",
        "layout_fingerprint": layout.fingerprint(),
        "num_params": layout.num_params,
        "keep_fraction": 0.1,
        "keep_layout": "entries",
        "final_weights": weights_fingerprint(layout.params_of(model)),
        "k": k,
        "dtype": "float32",
        "seed": 0,
        "num_shards": 1,
        "decay": [1.0] * len(layout.names),
        "layout": layout.to_json(),
    }
    store.mkdir(parents=True)
    (store / "manifest.json").write_text(json.dumps(manifest, indent=1))
    rows = np.random.default_rng(0).normal(scale=1e-3, size=(16, k)).astype("<f4")
    (store / "shard-00000.g000001.rows").write_bytes(rows.tobytes())
    np.save(store / "shard-00000.g000001.ids.npy", np.arange(16, dtype=np.int64))
    sums = np.array([zlib.crc32(row.tobytes()) for row in rows], dtype=np.uint32)
    np.save(store / "shard-00000.g000001.sums.npy", sums)
    (store / "shard-00000.json").write_text(json.dumps({"generation": 1, "log_consumed": 0, "rows": 16, "purged": []}))
    (store / "shard-00000.log").write_bytes(b"")

"""kill -9 during training or inside forget: resuming / recovering gives the uninterrupted result."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import text_dataset, tiny_bert, tiny_config
from transformers import BertForSequenceClassification

from hf_amnesia import AmnesiaConfig, AmnesiacTrainer, StoreReader
from hf_amnesia.store.journal import JOURNAL, read_audit, recover, weights_fingerprint

SCRIPTS = Path(__file__).parent / "scripts"
TOL = 1e-6


def _run(args, env=None, expect_kill=False):
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


def _store(out):
    reader = StoreReader(Path(out) / "_amnesia_store")
    return {int(i): reader.read(int(i)) for i in reader.all_ids()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    _run([SCRIPTS / "crash_train.py", out])
    return load_file(str(out / "final.safetensors")), _store(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "env",
    [
        {"KILL_AT_STEP": "7"},  # between checkpoints: records after checkpoint-4 must be dropped
        {"HF_AMNESIA_CRASH_AT": "checkpoint:recorder_saved#3"},  # inside the 3rd checkpoint save
        {"HF_AMNESIA_CRASH_AT": "compact:generation_written"},  # inside the final compaction
    ],
    ids=["mid_training", "mid_checkpoint", "mid_compaction"],
)
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, uninterrupted, env):
    _kill_resume_and_compare(tmp_path, uninterrupted, env)


def _kill_resume_and_compare(out, uninterrupted, kill_env, run_env=None):
    """Train until killed (`kill_env`), resume, and compare weights and store with `uninterrupted`."""
    weights, store = uninterrupted
    _run([SCRIPTS / "crash_train.py", out], env={**kill_env, **(run_env or {})}, expect_kill=True)
    _run([SCRIPTS / "crash_train.py", out, "resume"], env=run_env)
    resumed = load_file(str(out / "final.safetensors"))
    for name in weights:
        assert (weights[name] - resumed[name]).abs().max() <= TOL, name
    got = _store(out)
    assert sorted(got) == sorted(store)
    assert max(float((got[i] - store[i]).abs().max()) for i in store) <= TOL


SUMS = {"SUMS_IN_MEMORY": "1"}


@pytest.fixture(scope="module")
def uninterrupted_sums(tmp_path_factory):
    out = tmp_path_factory.mktemp("full_sums")
    _run([SCRIPTS / "crash_train.py", out], env=SUMS)
    return load_file(str(out / "final.safetensors")), _store(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "env",
    [{"KILL_AT_STEP": "7"}, {"HF_AMNESIA_CRASH_AT": "checkpoint:recorder_saved#3"}],
    ids=["mid_training", "mid_checkpoint"],
)
def test_sigkill_then_resume_with_sums_in_memory(tmp_path, uninterrupted_sums, env):
    _kill_resume_and_compare(tmp_path, uninterrupted_sums, env, run_env=SUMS)


# -- forget ---------------------------------------------------------------------------------------

FORGET = """
import sys, json
from transformers import BertForSequenceClassification
from hf_amnesia import AmnesiaConfig, AmnesiacTrainer
model = BertForSequenceClassification.from_pretrained(sys.argv[1])
trainer = AmnesiacTrainer(model=model, args=AmnesiaConfig(output_dir=sys.argv[3], store_dir=sys.argv[2], report_to=[], use_cpu=True))
report = trainer.forget([2, 5, 11], save_to=sys.argv[1], scale=1.0, repair_steps=0)
print(json.dumps({"forgotten": report.forgotten, "already": report.already_forgotten, "unknown": report.unknown}))
"""


@pytest.fixture(scope="module")
def trained_bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    args = tiny_config(root / "run", keep_fraction=0.1, num_train_epochs=2, learning_rate=5e-3, store_dtype="float32")
    model = tiny_bert()
    AmnesiacTrainer(model=model, args=args, train_dataset=text_dataset(16)).train()
    model.save_pretrained(str(root / "model"))
    # The reference: the same request with no crash, on copies.
    ref = root / "ref"
    os.system(f"cp -r {root / 'run'} {ref}_run && cp -r {root / 'model'} {ref}_model")
    _run(["-c", FORGET, f"{ref}_model", f"{ref}_run/_amnesia_store", root / "tmp"])
    return root, BertForSequenceClassification.from_pretrained(f"{ref}_model").state_dict()


def _copy_case(root, tmp_path):
    os.system(f"cp -r {root / 'run'} {tmp_path / 'run'} && cp -r {root / 'model'} {tmp_path / 'model'}")
    return tmp_path / "model", tmp_path / "run" / "_amnesia_store"


def _rows_bytes(store, ids):
    """For each id, 32 bytes (8 float32 values, all non-zero) of its stored row."""
    reader = StoreReader(store)
    out = {}
    for i in ids:
        row = reader.read(i).numpy()
        nonzero = np.convolve(row != 0, np.ones(8), mode="valid") == 8
        start = int(np.flatnonzero(nonzero)[0])
        out[i] = row[start : start + 8].tobytes()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("point", ["forget:staged", "forget:committed", "swap", "purge"])
def test_sigkill_inside_forget_is_atomic_and_idempotent(tmp_path, trained_bert, point):
    root, reference = trained_bert
    model_dir, store = _copy_case(root, tmp_path)
    before = BertForSequenceClassification.from_pretrained(str(model_dir)).state_dict()
    _run(["-c", FORGET, model_dir, store, tmp_path / "x"], env={"HF_AMNESIA_CRASH_AT": point}, expect_kill=True)
    completed = recover(store)
    saved = BertForSequenceClassification.from_pretrained(str(model_dir))
    reader = StoreReader(store)
    # The store's model (whose further training it may record) is the saved one, crash or not.
    assert reader.manifest.final_weights == weights_fingerprint(reader.manifest.layout.params_of(saved))
    if point == "forget:staged":  # before the commit point: everything as before
        assert not completed
        assert all(torch.equal(saved.state_dict()[k], v) for k, v in before.items())
        assert all(reader.locate(i) for i in (2, 5, 11))
        assert saved.config.hf_amnesia_forgotten["count"] == 0
    else:  # after it: recovery completed the request
        assert completed and not (store / JOURNAL).exists()
        assert saved.config.hf_amnesia_forgotten["count"] == 3 and "hf_amnesia_forgotten_ids" not in saved.config
        assert not any(reader.locate(i) for i in (2, 5, 11))
        assert len(read_audit(store)) == 1
    # Running the request again completes it, and never subtracts twice.
    _run(["-c", FORGET, model_dir, store, tmp_path / "y"])
    final = BertForSequenceClassification.from_pretrained(str(model_dir)).state_dict()
    for name, value in reference.items():
        assert torch.allclose(final[name], value, rtol=0, atol=1e-6), name
    assert len(read_audit(store)) == (2 if point != "forget:staged" else 1)
    assert not list(store.parent.parent.glob("*.amnesia-*"))


def test_purged_rows_are_gone_from_the_raw_bytes(tmp_path, trained_bert):
    root, _ = trained_bert
    model_dir, store = _copy_case(root, tmp_path)
    secret = _rows_bytes(store, [2, 5, 11])
    kept = _rows_bytes(store, [3])
    _run(["-c", FORGET, model_dir, store, tmp_path / "x"])
    raw = b"".join(p.read_bytes() for p in store.iterdir() if p.is_file())
    for i, row in secret.items():
        # 8 consecutive non-zero values of the row would betray it.
        assert row not in raw, f"row of id {i} is still on disk"
    assert kept[3] in raw  # the check can find rows that are there


def test_audit_log_and_cli(tmp_path, trained_bert, capsys):
    from hf_amnesia.cli import main

    root, _ = trained_bert
    model_dir, store = _copy_case(root, tmp_path)
    (tmp_path / "ids.txt").write_text("2, 5\n11 999\n")
    assert (
        main(["forget", "--model", str(model_dir), "--store", str(store), "--ids-file", str(tmp_path / "ids.txt")]) == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["forgotten"] == 3 and out["unknown"] == [999]
    assert main(["forget", "--model", str(model_dir), "--store", str(store), "--ids", "5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["already_forgotten"] == 1
    assert main(["audit", str(store), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["forgotten"] for r in records] == [3, 0]
    first = records[0]
    assert first["count"] == 4 and first["model_before"] != first["model_after"] and first["purged"]
    assert len(first["ids_hmac"]) == 64 and "ids_sha256" not in first
    # The ids themselves never reach the log: its values are counts, flags, a time, a path and hex
    # digests (a substring test for "999" would trip on digests that happen to contain it).
    assert (first["count"], first["forgotten"], first["unknown"]) == (4, 3, 1)
    for key, value in first.items():
        assert not isinstance(value, (list, dict)), key
        if isinstance(value, str) and key not in ("time", "saved_to"):
            assert re.fullmatch(r"[0-9a-f]{32,64}", value), (key, value)
    assert records[1]["model_before"] == records[1]["model_after"]
    assert oct(os.stat(store / "audit.jsonl").st_mode & 0o777) == "0o600"
    assert main(["verify", str(store)]) == 0
    assert "all checksums match" in capsys.readouterr().out


def test_two_jobs_on_one_store_are_serialised(tmp_path, trained_bert):
    from hf_amnesia.store.journal import store_lock

    root, _ = trained_bert
    model_dir, store = _copy_case(root, tmp_path)
    with store_lock(store):
        job = subprocess.Popen(
            [sys.executable, "-c", FORGET, str(model_dir), str(store), str(tmp_path / "x")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            job.wait(timeout=8)
            pytest.fail("the second job ran while the store was locked")
        except subprocess.TimeoutExpired:
            pass
        assert read_audit(store) == []
    assert job.wait(timeout=300) == 0
    assert len(read_audit(store)) == 1


def test_forget_without_save_to_purges_nothing(tmp_path, trained_bert):
    root, _ = trained_bert
    model_dir, store = _copy_case(root, tmp_path)
    model = BertForSequenceClassification.from_pretrained(str(model_dir))
    trainer = AmnesiacTrainer(
        model=model,
        args=AmnesiaConfig(output_dir=str(tmp_path / "o"), store_dir=str(store), report_to=[], use_cpu=True),
    )
    report = trainer.forget([2, 5], scale=1.0, repair_steps=0)
    assert report.forgotten == [2, 5] and not report.committed
    assert StoreReader(store).locate(2) and read_audit(store) == []


def test_stale_model_is_not_saved_over_a_newer_one(tmp_path, trained_bert):
    from hf_amnesia import ForgetRequestError

    root, _ = trained_bert
    model_dir, store = _copy_case(root, tmp_path)
    stale = BertForSequenceClassification.from_pretrained(str(model_dir))
    _run(["-c", FORGET, model_dir, store, tmp_path / "x"])  # another job forgot 2, 5, 11 meanwhile
    trainer = AmnesiacTrainer(
        model=stale,
        args=AmnesiaConfig(output_dir=str(tmp_path / "o"), store_dir=str(store), report_to=[], use_cpu=True),
    )
    before = [p.detach().clone() for p in stale.parameters()]
    with pytest.raises(ForgetRequestError, match="newer"):
        trainer.forget([7], save_to=str(model_dir), scale=1.0, repair_steps=0)
    assert all(torch.equal(a, b) for a, b in zip(before, stale.parameters()))
    assert BertForSequenceClassification.from_pretrained(str(model_dir)).config.hf_amnesia_forgotten["count"] == 3
    assert StoreReader(store).locate(7)  # nothing was purged


def test_training_after_a_purge(tmp_path, trained_bert):
    """A new run refuses forgotten rows, and its compaction drops the purged (zeroed) rows."""
    from hf_amnesia import UnsupportedTrainingError

    root, _ = trained_bert
    model_dir, store = _copy_case(root, tmp_path)
    _run(["-c", FORGET, model_dir, store, tmp_path / "x"])
    model = BertForSequenceClassification.from_pretrained(str(model_dir))
    args = tiny_config(tmp_path / "run")
    data = text_dataset(16)
    with pytest.raises(UnsupportedTrainingError, match="forgotten"):
        AmnesiacTrainer(model=model, args=args, train_dataset=data).train()
    retained = data.select([i for i in range(16) if i not in (2, 5, 11)])
    retained = retained.add_column("dataset_id", [i for i in range(16) if i not in (2, 5, 11)])
    AmnesiacTrainer(model=model, args=args, train_dataset=retained).train()
    reader = StoreReader(store)
    assert sorted(reader.all_ids().tolist()) == [i for i in range(16) if i not in (2, 5, 11)]
    assert all(state.purged == [2, 5, 11] for state in reader.states)  # the store remembers what it erased
    assert sum(state.rows for state in reader.states) == 13  # the zeroed rows are gone
    assert reader.verify() == 13


@pytest.mark.slow
def test_the_cli_finishes_a_request_killed_inside_the_model_swap(tmp_path, trained_bert, capsys):
    """Killed between the two renames, the model folder is gone: the CLI recovers before it loads
    the model, and `hf-amnesia recover` does the same alone."""
    from hf_amnesia.cli import main

    root, reference = trained_bert
    for command in ("forget", "recover"):
        case = tmp_path / command
        case.mkdir()
        model_dir, store = _copy_case(root, case)
        _run(["-c", FORGET, model_dir, store, case / "x"], env={"HF_AMNESIA_CRASH_AT": "swap"}, expect_kill=True)
        assert not model_dir.exists() and (store / JOURNAL).exists()
        if command == "forget":
            assert main(["forget", "--model", str(model_dir), "--store", str(store), "--ids", "2", "5", "11"]) == 0
            assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["already_forgotten"] == 3
        else:
            assert main(["recover", str(store)]) == 0
            assert json.loads(capsys.readouterr().out)["completed_request"] is True
            assert main(["recover", str(store)]) == 0  # nothing left to do
            assert json.loads(capsys.readouterr().out)["completed_request"] is False
        saved = BertForSequenceClassification.from_pretrained(str(model_dir)).state_dict()
        assert all(torch.allclose(saved[k], v, rtol=0, atol=1e-6) for k, v in reference.items())
        assert not (store / JOURNAL).exists() and len(read_audit(store)) == (2 if command == "forget" else 1)


def test_the_cli_names_a_missing_model_folder_without_pointing_at_the_hub(tmp_path, capsys):
    from hf_amnesia.cli import main

    assert main(["forget", "--model", str(tmp_path / "gone"), "--store", str(tmp_path / "store"), "--ids", "1"]) == 2
    err = capsys.readouterr().err
    assert re.search("model folder .* does not exist", err)
    assert "repo" not in err.lower() and "hub" not in err.lower() and "Traceback" not in err

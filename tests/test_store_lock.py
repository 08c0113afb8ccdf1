"""One job at a time on a store: training holds the store's lock for the whole of `train()`; a
forget request (or another run) waits for it, says whom it waits for, and runs after."""

import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny import text_dataset, tiny_bert, tiny_config
from transformers import BertForSequenceClassification, TrainerCallback

from hf_amnesia import AmnesiacTrainer, StoreError
from hf_amnesia.store.journal import LOCK, read_audit, store_lock

JOURNAL_LOGGER = "hf_amnesia.store.journal"

# Trains a tiny BERT slowly (0.4 s per step, 8 steps) into the store at argv[2].
SLOW_TRAINING = """
import sys, time
sys.path.insert(0, sys.argv[3])
from tiny import text_dataset, tiny_bert, tiny_config
from transformers import TrainerCallback
from hf_amnesia import AmnesiacTrainer

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.4)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        model.save_pretrained(sys.argv[4])  # the weights the run ends with, while it still holds the lock
        open(sys.argv[4] + ".done", "w").close()
        time.sleep(2)

args = tiny_config(sys.argv[1], store_dir=sys.argv[2], keep_fraction=0.2, num_train_epochs=2, store_dtype="float32")
AmnesiacTrainer(model=tiny_bert(), args=args, train_dataset=text_dataset(16), callbacks=[Slow()]).train()
"""


def _holder(store: Path) -> dict | None:
    try:
        return json.loads((store / LOCK).read_text())
    except (OSError, ValueError):
        return None


def test_a_forget_waits_for_a_training_run_in_another_process(tmp_path, caplog):
    store, saved = tmp_path / "store", tmp_path / "trained"
    job = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_TRAINING,
            str(tmp_path / "run"),
            str(store),
            str(Path(__file__).parent),
            str(saved),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while (_holder(store) or {}).get("purpose") != "training run":
            assert job.poll() is None, job.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the training run never took the store's lock"
            time.sleep(0.05)
        assert _holder(store)["pid"] == job.pid
        while not Path(f"{saved}.done").exists():  # the run's final weights, saved before it lets go
            assert job.poll() is None, job.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the training run never saved its model"
            time.sleep(0.05)
        model = BertForSequenceClassification.from_pretrained(str(saved))
        forgetter = AmnesiacTrainer(model=model, args=tiny_config(tmp_path / "f", store_dir=str(store)))
        with caplog.at_level(logging.WARNING, logger=JOURNAL_LOGGER):
            # Had it not waited, the run's recording markers would make it refuse (a run is recording).
            report = forgetter.forget([1, 2], save_to=tmp_path / "forgot", scale=1.0, repair_steps=0)
        assert job.wait(timeout=120) == 0, job.stderr.read()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    assert report.forgotten == [1, 2]
    assert len(read_audit(store)) == 1
    assert f"is locked by a training run (pid {job.pid}, since " in caplog.text
    assert "this forget request waits until it ends" in caplog.text


class _StartTime(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()


def test_a_training_run_waits_for_a_forget_request(tmp_path, caplog):
    store = tmp_path / "store"
    store.mkdir()
    held, released = threading.Event(), []

    def forget_job():
        with store_lock(store, purpose="forget request"):
            held.set()
            time.sleep(1.5)
            released.append(time.monotonic())

    other = threading.Thread(target=forget_job)
    other.start()
    held.wait(10)
    started = _StartTime()
    args = tiny_config(tmp_path / "run", store_dir=str(store), keep_fraction=0.2)
    trainer = AmnesiacTrainer(model=tiny_bert(), args=args, train_dataset=text_dataset(8), callbacks=[started])
    with caplog.at_level(logging.WARNING, logger=JOURNAL_LOGGER):
        trainer.train()
    other.join()
    assert started.started > released[0]  # no step before the forget request ended
    assert f"is locked by a forget request (pid {os.getpid()}, since " in caplog.text
    assert "this training run waits until it ends" in caplog.text
    assert (store / LOCK).read_text() == ""  # released: the holder's note is gone


class _ForgetInside(TrainerCallback):
    def __init__(self, out):
        self.out, self.trainer = out, None

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.forget([0], save_to=self.out, scale=1.0, repair_steps=0)


def test_a_forget_inside_train_is_refused_and_the_lock_released(tmp_path):
    callback = _ForgetInside(tmp_path / "forgot")
    args = tiny_config(tmp_path / "run", keep_fraction=0.2)
    trainer = AmnesiacTrainer(model=tiny_bert(), args=args, train_dataset=text_dataset(8), callbacks=[callback])
    callback.trainer = trainer
    with pytest.raises(StoreError, match="already holds the lock on the store .* for a training run"):
        trainer.train()
    fd = os.open(Path(args.store_dir) / LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again: train() released it on the error
    finally:
        os.close(fd)
    assert not (tmp_path / "forgot").exists()


def test_store_lock_names_its_holder_and_keeps_its_default(tmp_path):
    with store_lock(tmp_path):
        holder = _holder(tmp_path)
        assert holder["purpose"] == "forget request" and holder["pid"] == os.getpid()
        assert time.strptime(holder["since"], "%Y-%m-%dT%H:%M:%SZ")
    assert (tmp_path / LOCK).read_text() == ""
    with store_lock(tmp_path, purpose="recovery"):
        assert _holder(tmp_path)["purpose"] == "recovery"

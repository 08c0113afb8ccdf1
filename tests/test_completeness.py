"""Completeness: the sum of every sample's delta is the whole training change (1 and 2 processes; deltas
written every step or summed in memory)."""

import json
import os

import pytest
from scripts.completeness import run
from tiny import run_two_processes

REL_TOL = 1e-4
SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "completeness.py")


def _check(result, world_size):
    assert result["world_size"] == world_size
    assert result["num_ids"] == 32
    assert result["forgotten"] == 32
    assert result["spread"] == 0.0  # every process holds the same weights
    assert result["committed"] and result["saved"] and result["left_in_store"] == 0
    assert result["clip_active"]  # gradient clipping changed some steps
    assert result["min_decay"] < 1.0  # AdamW decay was active
    assert result["completeness"] <= REL_TOL, result
    assert result["forget_all"] <= REL_TOL, result


@pytest.mark.parametrize("sums", [False, True], ids=["per_step_log", "sums_in_memory"])
def test_completeness_one_process(tmp_path, sums):
    _check(run(str(tmp_path), sum_deltas_in_memory=sums), 1)


@pytest.mark.slow
@pytest.mark.parametrize("extra, port", [((), 29533), (("sums",), 29541)], ids=["per_step_log", "sums_in_memory"])
def test_completeness_two_processes(tmp_path, extra, port):
    run_two_processes(SCRIPT, str(tmp_path), *extra, port=port, timeout=600)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_shards"] == 2
    _check(result, 2)


@pytest.mark.slow
def test_bounded_tails_in_two_processes(tmp_path):
    # Tails bounded to 3 steps on both processes: the same estimate on each (the weights agree),
    # the store says so, and the deltas stay near the training change (measured 0.034).
    run_two_processes(SCRIPT, str(tmp_path), "bounded", port=29547, timeout=600)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["num_shards"] == 2 and result["spread"] == 0.0
    assert result["bounded_tail_steps"] == 3
    assert result["completeness"] <= 0.1 and result["forgotten"] == 32 and result["committed"]

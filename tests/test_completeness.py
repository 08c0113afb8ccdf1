"""Completeness: the sum of every sample's delta is the whole training change (1 and 2 processes)."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from completeness import run  # noqa: E402

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


def test_completeness_one_process(tmp_path):
    _check(run(str(tmp_path)), 1)


@pytest.mark.slow
def test_completeness_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        SCRIPT,
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_shards"] == 2
    _check(result, 2)

"""The GPU benchmark scripts run on the CPU at width 4 (`--smoke`), so they work when a GPU is there."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _last_json(script):
    # run as a file, as benchmarks/gpu.sh does (the script itself makes `benchmarks` and `recipes` importable)
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith('{"')))


@pytest.mark.slow
def test_gpu_profile_smoke():
    out, result = _last_json("gpu_profile.py")
    assert {"plain_ms", "rows_ms", "rows_sums_ms", "overhead_rows", "overhead_rows_sums_late"} <= result.keys()
    assert all(result[k] > 0 for k in ("plain_ms", "rows_ms", "rows_sums_ms", "conv_grouped_conv_ms"))
    # both conv rules give the same kept rows on every conv layer (float32, relative to the largest entry)
    differences = [float(line.rsplit(" ", 1)[-1]) for line in out.splitlines() if "relative difference" in line]
    assert len(differences) == 20 and max(differences) < 1e-5
    assert "profile of 3 recording steps" in out


@pytest.mark.slow
def test_gpu_resnet18_smoke():
    _, result = _last_json("gpu_resnet18.py")
    assert result["device"] == "cpu" and result["params"] > 0
    assert result["overhead_resnet18"] > 0 and result["overhead_resnet18_entries"] > 0


@pytest.mark.slow
def test_floor_and_tails_benchmarks_smoke():
    _, floor = _last_json("floor.py")
    assert floor["floor_ms"] > 0 and floor["floor_bounded_ms"] > 0 and floor["floor_ratio_mlp_11m"] > 1.0
    _, tails = _last_json("tails.py")
    assert tails["completeness_rel_err_exact"] <= 1e-4 < tails["completeness_rel_err_bounded"]
    assert tails["tail_memory_mb_resnet18"] <= 1024 < tails["tail_memory_mb_resnet18_exact"]


@pytest.mark.slow
def test_gpu_sh_smoke_runs_every_part_on_the_cpu(tmp_path):
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--smoke", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "completeness.json").read_text())
    assert result["completeness"] <= 1e-4
    assert '"overhead_rows"' in (tmp_path / "profile.log").read_text()

#!/usr/bin/env bash
# The GPU checks, in one run on a machine with a CUDA card (from the repository root):
#
#     bash benchmarks/gpu.sh [LOG_DIR]
#     bash benchmarks/gpu.sh --smoke [LOG_DIR]   # on the CPU, tiny sizes: checks the script works
#
# 1. completeness on the GPU: the sum of every sample's recorded delta equals the training change;
# 2. the trainer tests on the GPU (HF_AMNESIA_TEST_DEVICE=cuda; TF32 off, so the oracles'
#    tolerances mean what they mean on the CPU);
# 3. benchmarks/gpu_profile.py: recording overhead, peak GPU memory and a profile of a ResNet-18
#    (the card's default math: TF32 convolutions on).
# benchmarks/gpu_resnet18.py adds the `entries` layout (its positions are hashed on the host).
# Each part's log goes to LOG_DIR (default gpu_logs/); a failing part does not stop the others.
set -u -o pipefail
smoke=""
if [ "${1:-}" = "--smoke" ]; then smoke="--smoke"; shift; fi
logs=${1:-gpu_logs}
mkdir -p "$logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
device=cuda
if [ -n "$smoke" ]; then
    device=cpu
    echo "smoke run on the CPU" | tee "$logs/device.txt"
else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$logs/device.txt"
fi
python3 -c "import torch, transformers, opacus, accelerate, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'opacus', opacus.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)" | tee -a "$logs/device.txt"

echo "== completeness on the GPU"
out=$(mktemp -d)
HF_AMNESIA_TEST_DEVICE=$device NVIDIA_TF32_OVERRIDE=0 timeout 120 python3 tests/scripts/completeness.py "$out" >"$logs/completeness.log" 2>&1 || status=1
cat "$out/result.json" 2>/dev/null | tee "$logs/completeness.json" || tail -20 "$logs/completeness.log"
echo

echo "== trainer tests on the GPU"
if [ -n "$smoke" ]; then
    echo "(skipped in a smoke run: the CI runs them on the CPU)"
else
HF_AMNESIA_TEST_DEVICE=cuda NVIDIA_TF32_OVERRIDE=0 timeout 200 python3 -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/test_completeness.py tests/test_rows_layout.py tests/test_forget.py tests/test_auto_forget.py \
    tests/test_checkpoint_resume.py tests/test_refusals_and_config.py tests/test_bad_input.py \
    >"$logs/tests.log" 2>&1 || status=1
tail -25 "$logs/tests.log"
fi

echo "== ResNet-18 recording overhead and profile (the default tail budget: bounded tails)"
timeout 300 python3 benchmarks/gpu_profile.py $smoke 2>&1 | grep --line-buffered -v "train_runtime" | tee "$logs/profile.log" || status=1

exit $status

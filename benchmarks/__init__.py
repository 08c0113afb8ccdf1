"""Benchmarks of recording and forgetting, and the GPU checks (benchmarks/gpu.sh).

Part of the repository, not of the installed package. From the repository root:

    python benchmarks/run.py --quick      # or: python -m benchmarks.run --quick
    bash benchmarks/gpu.sh
"""

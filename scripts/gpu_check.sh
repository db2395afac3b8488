#!/usr/bin/env bash
# One-go check on a machine with an NVIDIA GPU (a few minutes): install with
# CUDA JAX, run the test suite (fast tests) on the GPU, then the benchmark at
# the larger cohorts of the performance issue (10,000 clients on A, 1,000 on
# B), printing client updates per second and the fraction of the card's peak.
# Record what it prints in docs/benchmarks.md with the card's name.
#
#   bash scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/fedjax_dp_gpu}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Exact replays (resume) need deterministic GPU reductions.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true"
if ! python3 -c "import jax; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
  python3 -m pip install -q -e '.[test]' 'jax[cuda12]' || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
# Fast tests on the GPU (the slow end-to-end ones are CPU-sized).
timeout 420 python3 -m pytest -q -x -m "not slow" 2>&1 | tee "$out/tests.log" | tail -n 5
# Benchmarks at accelerator-sized cohorts.
# Accelerators want wide vmaps: the shapes are the vmapped chunks (and the
# CPU's plain layout, c2_indep, for comparison) rather than the CPU's default
# list. B's `factored` is the factored CNN round laid out as on this backend
# (vmapped chunks of up to 256 clients): the CPU default, not yet measured
# on a GPU, where "auto" keeps the plain vmapped round.
timeout 600 python3 scripts/benchmark.py --workloads A --cohort 10000 --population 34000 \
  --shapes loop,c100_unroll,c1000_unroll,factored --json \
  2>&1 | tee "$out/bench_A.json" | tail -n 3
timeout 600 python3 scripts/benchmark.py --workloads B --cohort 1000 \
  --shapes loop,c100_unroll,c1000_unroll,c2_indep,factored --json \
  2>&1 | tee "$out/bench_B.json" | tail -n 3

#!/bin/sh
# run-gpu: the GPU benchmarks in one go, for a machine with a GPU: bench_kernels (esft's
# kernels and cuBLAS calls on one Qwen3-30B-A3B-shaped layer), then torch_qwen3_moe.py
# (transformers' Qwen3-MoE on the same shape). Each runs whatever the other did, under
# its own time limit; the full outputs go to OUTDIR/bench_kernels.txt and
# OUTDIR/torch_qwen3_moe.txt. Exits non-zero when either failed.
#
# Usage (from the repository root; tests/bench/bench_kernels built, by `make
# tests/bench/bench_kernels` here or on another machine: it needs only the CUDA runtime
# and cuBLAS):
#   tests/bench/run-gpu.sh [OUTDIR]        (default out/bench)
# Environment: BENCH_ARGS (bench_kernels options), TORCH_ARGS (torch_qwen3_moe.py
# options), PYTHON (default python3).
set -u

cd "$(dirname "$0")/../.."
out=${1:-out/bench}
mkdir -p "$out"
status=0

echo "== bench_kernels ${BENCH_ARGS:-}"
timeout 300 tests/bench/bench_kernels ${BENCH_ARGS:-} >"$out/bench_kernels.txt" 2>&1
rc=$?
cat "$out/bench_kernels.txt"
[ $rc -eq 0 ] || { echo "bench_kernels: exit status $rc"; status=1; }

echo "== torch_qwen3_moe.py ${TORCH_ARGS:-}"
PYTHONUNBUFFERED=1 timeout 240 "${PYTHON:-python3}" tests/bench/torch_qwen3_moe.py ${TORCH_ARGS:-} \
    >"$out/torch_qwen3_moe.txt" 2>&1
rc=$?
cat "$out/torch_qwen3_moe.txt"
[ $rc -eq 0 ] || { echo "torch_qwen3_moe.py: exit status $rc"; status=1; }
exit $status

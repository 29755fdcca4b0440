#!/bin/sh
# run-forward: esft's CPU forward pass against transformers on the ~100M qwen3_moe
# checkpoint of input/bench-100m.yaml, same batch, same thread count; prints one table.
#
# Usage (from anywhere; works in the repository root):
#   tests/bench/run-forward.sh [--threads N] [--batch 8] [--seq 512] [--iters 5]
#                              [--warmup 1] [--experts eager,grouped_mm,batched_mm]
# Threads default to OMP_NUM_THREADS, else the number of cores. Needs ./esft and
# tests/bench/bench_forward built (the command is printed when it is missing), and for
# the transformers side python3 with torch, transformers and safetensors (developers
# only: without them only esft's line is printed). Each program's full output is kept
# in out/bench/forward-<threads>t.{esft,hf}.txt.
set -eu

cd "$(dirname "$0")/../.."

threads=${OMP_NUM_THREADS:-$(nproc)}
batch=8
seq=512
iters=5
warmup=1
experts=eager,grouped_mm,batched_mm
while [ $# -gt 0 ]; do
    case $1 in
    --threads) threads=$2 ;;
    --batch) batch=$2 ;;
    --seq) seq=$2 ;;
    --iters) iters=$2 ;;
    --warmup) warmup=$2 ;;
    --experts) experts=$2 ;;
    *)
        echo "usage: $0 [--threads N] [--batch B] [--seq T] [--iters n] [--warmup w] [--experts LIST]" >&2
        exit 2
        ;;
    esac
    shift 2
done

model=out/bench/qwen3-moe-100m
bench=${BENCH_FORWARD:-tests/bench/bench_forward}
if [ ! -x "$bench" ]; then
    echo "run-forward: $bench is not built; build it with:" >&2
    echo "  mpicc -std=c11 -D_POSIX_C_SOURCE=200809L -fopenmp -O2 -Wall -Wextra -Wshadow -I src -I . \\" >&2
    echo "    tests/bench/bench_forward.c libesft.a \$(pkg-config --libs yaml-0.1 jansson hdf5-openmpi openblas) -lm \\" >&2
    echo "    -o tests/bench/bench_forward   # + the CUDA libraries when configured with CUDA" >&2
    exit 1
fi
if [ ! -f "$model/config.json" ]; then
    echo "run-forward: writing the benchmark model ($model)" >&2
    ./esft input/bench-100m.yaml >&2
fi

# Both sides see the same thread count: OpenMP and OpenBLAS for esft (OpenBLAS reads
# OPENBLAS_NUM_THREADS before OMP_NUM_THREADS), torch.set_num_threads for transformers.
export OMP_NUM_THREADS="$threads" OPENBLAS_NUM_THREADS="$threads"
shape="--batch $batch --seq $seq --iters $iters --warmup $warmup"
esft_out=out/bench/forward-${threads}t.esft.txt
hf_out=out/bench/forward-${threads}t.hf.txt

echo "run-forward: esft, $threads threads, batch $batch x $seq" >&2
# shellcheck disable=SC2086
"$bench" "$model" $shape >"$esft_out"
if python3 -c 'import torch, transformers, safetensors' 2>/dev/null; then
    echo "run-forward: transformers ($experts), $threads threads" >&2
    # shellcheck disable=SC2086
    python3 tests/bench/bench_forward_hf.py "$model" $shape --threads "$threads" \
        --experts "$experts" >"$hf_out" 2>"$hf_out.log" || {
        echo "run-forward: bench_forward_hf.py failed; see $hf_out.log" >&2
        exit 1
    }
else
    echo "run-forward: no python3 torch + transformers: esft only" >&2
    : >"$hf_out"
fi

# One table from the "key: value" blocks of both outputs; the ratio column is each
# implementation's tokens/s over transformers eager's.
cat "$esft_out" "$hf_out" | awk -v cpu="$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)" '
    function flush() {
        if (name == "") return
        n++; names[n] = name; thr[n] = threads; tps[n] = tokens_per_s; sec[n] = seconds
        lo[n] = loss; why[n] = skipped
        if (name ~ /^transformers eager/) eager = tokens_per_s
        name = threads = tokens_per_s = seconds = loss = skipped = ""
    }
    /^implementation: / { flush(); name = substr($0, 17); sub(/ \(.*/, "", name) }
    /^threads: / { threads = $2 }
    /^tokens per iteration: / { tokens = $4 }
    /^batch: / { shape = $2 " x " $4 }
    /^median seconds per iteration: / { seconds = $5 }
    /^tokens per second: / { tokens_per_s = $4 }
    /^loss: / { loss = $2 }
    /^skipped: / { skipped = substr($0, 10) }
    END {
        flush()
        printf "forward pass, qwen3_moe ~140M (input/bench-100m.yaml), batch %s = %s tokens, fp32, CPU: %s\n\n", shape, tokens, cpu
        printf "| %-30s | %7s | %10s | %10s | %9s | %11s |\n", "implementation", "threads", "tokens/s", "s/iter", "loss", "vs HF eager"
        printf "|%s|%s|%s|%s|%s|%s|\n", "--------------------------------", "---------", "------------", "------------", "-----------", "-------------"
        for (i = 1; i <= n; i++) {
            if (why[i] != "") {
                printf "| %-30s | %7s | %10s | %10s | %9s | %10s |\n", names[i], thr[i], "-", "-", "-", "skipped"
                continue
            }
            ratio = eager > 0 ? sprintf("%.2fx", tps[i] / eager) : "-"
            printf "| %-30s | %7s | %10.1f | %10.4f | %9s | %10s |\n", names[i], thr[i], tps[i], sec[i], lo[i], ratio
        }
        if (eager > 0 && tps[1] > 0)
            printf "\nesft / transformers eager: %.2fx tokens/s (> 1: esft is faster)\n", tps[1] / eager
        for (i = 1; i <= n; i++)
            if (why[i] != "") printf "%s skipped: %s\n", names[i], why[i]
    }'

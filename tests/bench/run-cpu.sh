#!/bin/sh
# run-cpu: esft on the CPU against transformers in its fastest CPU configuration, in one
# command (`make bench-cpu`): forward (8 x 512 tokens), full train step and ESFT train step
# (1 x 512 tokens, the same selected experts on both sides), each run by both programs in
# turn, repetition after repetition; prints one table (README "CPU benchmark").
#
# Usage (from anywhere; works in the repository root):
#   tests/bench/run-cpu.sh [--threads N] [--reps 5] [--warmup 1] [--hf-experts auto|NAME]
#                          [--no-hf] [--quick] [--report]
#
#   --threads     threads of both sides (default OMP_NUM_THREADS, else the cores)
#   --reps        repetitions; each runs every phase once in each program (fresh process)
#   --warmup      untimed iterations (forward passes or steps) at the start of each run
#   --hf-experts  transformers' experts implementation; auto (default) times one forward
#                 of eager, grouped_mm and batched_mm and takes the fastest, once for the
#                 forward's shape and once for the train steps' shape
#   --no-hf       esft's rows only (also what happens when python3 lacks torch or
#                 transformers, as on CI)
#   --report      print the table of the last run again (its files in out/bench-cpu/runs)
#   --quick       a 2-layer, 64-wide model, 2 x 64 tokens, 1 repetition: seconds, for
#                 checking the script (tests/test-bench-cpu.sh), not for figures
#
# The model, data and selection: tests/bench/bench-cpu.yaml (written into out/bench-cpu/
# once: init, prepare, score, select). The programs: ESFT (default ./esft), BENCH_FORWARD
# (tests/bench/bench_forward), GEMM_PEAK (tests/bench/gemm_peak), BENCH_CPU_HF (default
# "$PYTHON tests/bench/bench_cpu_hf.py", PYTHON default python3). Every run's output is
# kept in out/bench-cpu[-quick]/runs/ (BENCH_CPU_OUT: another directory).
#
# The columns: the median seconds of the runs and their range, the ratio (transformers'
# median over esft's: > 1 when esft is faster), tokens/s, achieved GFLOP/s (model FLOPs as
# esft counts them, src/flops.c: the same count for both programs; a train step's is the
# full fine-tuning step's, for ESFT as well) and its share of the GEMM peak (gemm_peak:
# every thread its own single-threaded 1536^3 sgemm with esft's BLAS), and the largest
# peak resident set of the runs.
set -eu

cd "$(dirname "$0")/../.."

threads=${OMP_NUM_THREADS:-$(nproc)}
reps=5
warmup=1
hf_experts=auto
hf=yes
quick=no
report=no
while [ $# -gt 0 ]; do
    case $1 in
    --threads) threads=$2; shift ;;
    --reps) reps=$2; shift ;;
    --warmup) warmup=$2; shift ;;
    --hf-experts) hf_experts=$2; shift ;;
    --no-hf) hf=no ;;
    --quick) quick=yes ;;
    --report) report=yes ;;
    *)
        echo "usage: $0 [--threads N] [--reps n] [--warmup w] [--hf-experts auto|NAME] [--no-hf] [--quick] [--report]" >&2
        exit 2
        ;;
    esac
    shift
done

esft=${ESFT:-./esft}
bench_forward=${BENCH_FORWARD:-tests/bench/bench_forward}
gemm_peak=${GEMM_PEAK:-tests/bench/gemm_peak}
python=${PYTHON:-python3}
hf_bench=${BENCH_CPU_HF:-$python tests/bench/bench_cpu_hf.py}
for program in "$esft" "$bench_forward" "$gemm_peak"; do
    if [ ! -x "$program" ]; then
        echo "run-cpu: $program is not built (make esft tests/bench/bench_forward tests/bench/gemm_peak)" >&2
        exit 1
    fi
done

deck=tests/bench/bench-cpu.yaml
if [ "$quick" = yes ]; then
    out=${BENCH_CPU_OUT:-out/bench-cpu-quick}
    batch=2 seq=64 reps=1 peak_size=256
    # a model of seconds: 2 layers, hidden 64, 8 experts top-2
    shape="init.hidden_size=64 init.num_layers=2 init.num_heads=4 init.num_kv_heads=2
        init.head_dim=16 init.vocab_size=512 init.intermediate_size=128
        init.moe_intermediate_size=32 init.num_experts=8 init.top_k=2 data.seq_len=64
        score.n_sample_tokens=256"
else
    out=${BENCH_CPU_OUT:-out/bench-cpu}
    batch=8 seq=512 peak_size=1536
    shape=""
fi
paths="run.output_dir=$out model.path=$out/model prepare.inputs=[$out/text.jsonl]
    prepare.output=$out/data.h5 data.path=$out/data.h5 train.expert_config=$out/expert_config.json"
runs=$out/runs
phases="forward full esft"

print_table() {
    # One table. Every run file gives its seconds ("median seconds per iteration" of a
    # one-iteration run, or "seconds" lines), peak RSS and model FLOPs.
    cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
    blas=$(sed -n 's/^BLAS: //p' "$runs/esft-version.txt")
    policy=$(sed -n 's/^OpenMP: .*wait policy //p' "$runs/esft-version.txt")
    threads=$(sed -n 's/^threads: //p' "$runs/gemm-peak.txt") # the run's, for --report
    hf=no hf_name="" hf_forward_experts="" hf_train_experts=""
    if [ -f "$runs/r1.forward.hf.txt" ]; then
        hf=yes
        hf_name=$(sed -n 's/^implementation: //p' "$runs/r1.forward.hf.txt" | sed 's/, experts [^,]*//')
        hf_forward_experts=$(sed -n 's/^implementation: .*, experts \([^,]*\),.*/\1/p' "$runs/r1.forward.hf.txt")
        hf_train_experts=$(sed -n 's/^implementation: .*, experts \([^,]*\),.*/\1/p' "$runs/r1.full.hf.txt")
    fi
    set -- "$runs"/r*.forward.esft.txt
    reps=$#
    selected=$(awk '/"experts"/ { on = 1; next } on && /}/ { exit }
        on { sub(/^[^:]*:/, ""); n += gsub(/[0-9]+/, "&") } END { print n + 0 }' "$out/expert_config.json")
    layers=$(sed -n 's/.*"num_hidden_layers": *\([0-9]*\).*/\1/p' "$out/model/config.json")
    experts=$(sed -n 's/.*"num_experts": *\([0-9]*\).*/\1/p' "$out/model/config.json")
    selected="$selected of $((layers * experts)) experts"
    for phase in $phases; do
        for side in esft hf; do
            for f in "$runs"/r*."$phase.$side.txt"; do
                [ -f "$f" ] || continue
                sed -n "s/^median seconds per iteration: /$phase $side seconds /p
                        s/^seconds: /$phase $side seconds /p
                        s/^peak rss mib: /$phase $side rss /p
                        s/^model flops per iteration: /$phase $side flops /p
                        s/^tokens per iteration: /$phase $side tokens /p" "$f"
            done
        done
    done | awk -v cpu="$cpu" -v blas="$blas" -v threads="$threads" -v policy="$policy" \
        -v peak="$(sed -n 's/^gemm peak gflops: //p' "$runs/gemm-peak.txt")" \
        -v reps="$reps" -v hf="$hf" -v hf_name="$hf_name" -v quick="$quick" \
        -v experts_fwd="$hf_forward_experts" -v experts_train="$hf_train_experts" \
        -v batch="$batch" -v seq="$seq" -v selected="$selected" \
        -v date="$(cat "$runs/date.txt")" -v load="$(cat "$runs/load-start.txt") at the start, $(cat "$runs/load-end.txt") at the end" '
        function median(key,   n, i, j, v, tmp) {
            n = count[key]
            for (i = 1; i <= n; i++) v[i] = value[key, i]
            for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] > v[j]; j--) { tmp = v[j]; v[j] = v[j - 1]; v[j - 1] = tmp }
            low[key] = v[1]; high[key] = v[n]
            return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
        }
        $3 == "seconds" { key = $1 SUBSEP $2; value[key, ++count[key]] = $4 }
        $3 == "rss" && $4 > rss[$1, $2] { rss[$1, $2] = $4 }
        $3 == "flops" && $2 == "esft" { flops[$1] = $4 }
        $3 == "tokens" { tokens[$1] = $4 }
        END {
            title["forward"] = "forward " batch " x " seq
            title["full"] = "full train step 1 x " seq
            title["esft"] = "ESFT train step 1 x " seq
            tokens["full"] = tokens["esft"] = seq
            if (!tokens["forward"]) tokens["forward"] = batch * seq
            printf "CPU benchmark%s, %s: %s, %s threads (OpenMP wait policy %s), load average %s\n",
                (quick == "yes" ? " (--quick: a toy model, not for figures)" : ""), date, cpu, threads, policy, load
            printf "esft BLAS: %s; fp32 GEMM peak %.1f GFLOP/s (%s threads, gemm_peak)\n", blas, peak, threads
            if (hf == "yes")
                printf "transformers: %s; experts %s (forward), %s (train steps)\n", hf_name, experts_fwd,
                    experts_train
            printf "ESFT: %s trainable; medians of %d repetitions, each a fresh process per program and phase\n\n", selected, reps
            printf "| %-24s | %-12s | %8s | %17s | %7s | %8s | %8s | %6s | %8s |\n", "phase", "program",
                "median s", "min-max s", "ratio", "tokens/s", "GFLOP/s", "% peak", "peak RSS"
            printf "|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n", "--------------------------", "--------------",
                "----------", "-------------------", "---------", "----------", "----------", "--------", "----------"
            split("forward full esft", phase_list, " ")
            for (p = 1; p <= 3; p++) {
                phase = phase_list[p]
                esft_key = phase SUBSEP "esft"; hf_key = phase SUBSEP "hf"
                if (!count[esft_key]) continue
                esft_median = median(esft_key)
                hf_median = count[hf_key] ? median(hf_key) : 0
                for (side = 1; side <= 2; side++) {
                    key = side == 1 ? esft_key : hf_key
                    if (!count[key]) continue
                    m = side == 1 ? esft_median : hf_median
                    ratio = side == 1 && hf_median > 0 ? sprintf("%.2fx", hf_median / esft_median) : ""
                    gflops = flops[phase] / m / 1e9
                    name = side == 1 ? "esft" : "transformers"
                    label = side == 1 ? title[phase] : ""
                    share = peak > 0 ? 100 * gflops / peak : 0
                    resident = rss[phase, side == 1 ? "esft" : "hf"]
                    printf "| %-24s | %-12s | %8.3f | %8.3f - %6.3f | %7s | %8.1f | %8.1f | %5.1f%% | %4.0f MiB |\n",
                        label, name, m, low[key], high[key], ratio, tokens[phase] / m, gflops, share, resident
                }
            }
            if (hf == "yes")
                print "\nratio: transformers median / esft median (> 1: esft is faster)"
            else
                print "\ntransformers: not run (no python3 with torch and transformers, or --no-hf): esft rows only"
        }'
}

if [ "$report" = yes ]; then
    print_table
    exit 0
fi
rm -rf "$runs"
mkdir -p "$runs"

# Both sides see the same thread count: OpenMP (and, for a BLAS that reads them, its own
# variables; esft keeps it single-threaded anyway) and torch.set_num_threads.
export OMP_NUM_THREADS="$threads" OPENBLAS_NUM_THREADS="$threads" BLIS_NUM_THREADS="$threads"

# The training text: README's printable ASCII in rows of >= 3000 bytes, so that every
# 512-token block of the byte tokenizer is one document.
if [ ! -f "$out/text.jsonl" ]; then
    LC_ALL=C awk '{ gsub(/[^ -~]/, ""); gsub(/[\\"]/, ""); row = row $0 " "
        if (length(row) >= 3000) { print "{\"text\": \"" row "\"}"; row = ""; if (++n == 16) exit } }' \
        README >"$out/text.jsonl"
fi
# shellcheck disable=SC2086 # lists of deck overrides
if [ ! -f "$out/model/config.json" ]; then
    echo "run-cpu: writing the benchmark model ($out/model)" >&2
    "$esft" "$deck" phase=init $paths $shape >"$runs/setup.log" 2>&1
fi
# shellcheck disable=SC2086
if [ ! -f "$out/expert_config.json" ]; then
    echo "run-cpu: preparing the data and selecting the experts ($out)" >&2
    "$esft" "$deck" "phase=[prepare,score,select]" $paths $shape >>"$runs/setup.log" 2>&1
fi

if [ "$hf" = yes ] && ! $python -c 'import torch, transformers' 2>/dev/null; then
    [ -n "${BENCH_CPU_HF:-}" ] || {
        hf=no
        echo "run-cpu: $python has no torch + transformers: esft only" >&2
    }
fi

# the 1-, 5- and 15-minute load averages at the start and at the end: other processes
# on the machine show there
cut -d' ' -f1-3 /proc/loadavg >"$runs/load-start.txt"
"$gemm_peak" --size "$peak_size" --repeats 3 >"$runs/gemm-peak.txt"
"$esft" --version >"$runs/esft-version.txt"

# transformers' experts implementation: the fastest forward at each shape
hf_forward_experts=$hf_experts
hf_train_experts=$hf_experts
if [ "$hf" = yes ] && [ "$hf_experts" = auto ]; then
    echo "run-cpu: transformers: timing its experts implementations" >&2
    # shellcheck disable=SC2086
    $hf_bench pick "$out/model" --batch "$batch" --seq "$seq" --threads "$threads" \
        --experts eager,grouped_mm,batched_mm >"$runs/pick-forward.txt" 2>"$runs/pick-forward.log"
    # shellcheck disable=SC2086
    $hf_bench pick "$out/model" --batch 1 --seq "$seq" --threads "$threads" \
        --experts eager,grouped_mm,batched_mm >"$runs/pick-train.txt" 2>"$runs/pick-train.log"
    hf_forward_experts=$(sed -n 's/^fastest experts: //p' "$runs/pick-forward.txt")
    hf_train_experts=$(sed -n 's/^fastest experts: //p' "$runs/pick-train.txt")
fi

# The train steps of esft, as the same "key: value" lines: the time of a step is the
# difference of successive "step" events' `time` in metrics.jsonl (the first `warmup`
# steps untimed); its model FLOPs from the cumulative rate esft logs.
esft_step_lines() { # metrics.jsonl warmup
    awk -v warmup="$2" '
        function field(name,   m) {
            if (!match($0, "\"" name "\": [-0-9.e+]+")) return ""
            m = substr($0, RSTART, RLENGTH); sub(/.*: /, "", m); return m + 0
        }
        /"event": "step"/ {
            n++; t[n] = field("time"); rss = field("peak_rss_mib")
            # model_tflops and tokens_per_second are over the run so far: their ratio is
            # the FLOPs of a token
            flops = field("model_tflops") * 1e12 / field("tokens_per_second") * field("tokens")
        }
        END {
            for (i = warmup + 1; i <= n; i++) printf "seconds: %.4f\n", t[i] - t[i - 1]
            printf "model flops per iteration: %.6g\npeak rss mib: %.1f\n", flops, rss
        }' "$1"
}

r=1
while [ "$r" -le "$reps" ]; do
    echo "run-cpu: repetition $r of $reps" >&2
    for phase in $phases; do
        file=$runs/r$r.$phase
        if [ "$phase" = forward ]; then
            "$bench_forward" "$out/model" --batch "$batch" --seq "$seq" --iters 1 \
                --warmup "$warmup" --breakdown 0 >"$file.esft.txt" 2>"$file.esft.log" || {
                echo "run-cpu: bench_forward failed; see $file.esft.log" >&2
                exit 1
            }
        else
            dir=$runs/r$r.$phase.esft
            # shellcheck disable=SC2086
            "$esft" "$deck" phase=train train.method="$phase" train.steps=$((warmup + 1)) \
                $paths $shape run.output_dir="$dir" >"$file.esft.log" 2>&1 || {
                echo "run-cpu: esft failed; see $file.esft.log" >&2
                exit 1
            }
            esft_step_lines "$dir/metrics.jsonl" "$warmup" >"$file.esft.txt"
            cp "$dir/metrics.jsonl" "$file.esft.metrics.jsonl"
            rm -rf "$dir" # checkpoints: up to GBs each
        fi
        if [ "$hf" = yes ]; then
            experts=$hf_train_experts
            [ "$phase" = forward ] && experts=$hf_forward_experts
            # shellcheck disable=SC2086
            $hf_bench "$phase" "$out/model" --batch "$batch" --seq "$seq" --iters 1 \
                --warmup "$warmup" --threads "$threads" --experts "$experts" \
                --text "$out/text.jsonl" --expert-config "$out/expert_config.json" \
                >"$file.hf.txt" 2>"$file.hf.log" || {
                echo "run-cpu: transformers failed; see $file.hf.log" >&2
                exit 1
            }
        fi
    done
    r=$((r + 1))
done


cut -d' ' -f1-3 /proc/loadavg >"$runs/load-end.txt"
date -u '+%Y-%m-%d %H:%M UTC' >"$runs/date.txt"
print_table

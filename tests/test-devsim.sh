#!/bin/sh
# test-devsim: whole phases on the device simulator (run.backend: cpu-devsim, whose
# buffers the host cannot read) give the CPU backend's results bit for bit. On the demo
# model, under (ranks, pp, ep) = (1,1,1), (2,1,2), (2,2,1) and (4,2,2): score's routing
# statistics (through select's scores and choice), train's loss, accuracy, aux loss and
# gradient norm at every step and its eval losses (ESFT with the load-balancing loss),
# the exported adapter's bytes, and eval of that adapter; and a run stopped at step 3 that
# resumes from its checkpoint on the simulator continues the CPU's uninterrupted curve;
# and train.recompute gives the same curve and adapter under three layouts.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin devsim

demo="$src/input/demo.yaml"
d="$tmp/demo"
common="model.path=$d/model data.path=$d/data.h5 prepare.output=$d/data.h5 prepare.inputs=[$src/input/data/demo.jsonl]"
# shellcheck disable=SC2086 # $common is a list of overrides
expect 0 "demo model and data" "$esft" "$demo" "phase=[init,prepare]" "run.output_dir=$d" $common

# the numbers of every step and eval line of a metrics file, without the timings
numbers() {
    grep -E '"event": "(step|eval)"' "$1" |
        grep -o -E '"(event|step|loss|accuracy|aux_loss|grad_norm)": [^,}]*' | tr '\n' ' '
}
# the per-layer scores and selected experts of an expert_config.json
choice() {
    sed -n '/"experts"/,$p' "$1" | grep -v '"path"'
}

train="train.steps=6 train.eval_every=3 train.checkpoint_every=3 train.aux_loss_coef=0.01"
for layout in "1 1 1" "2 1 2" "2 2 1" "4 2 2"; do
    set -- $layout
    for backend in cpu cpu-devsim; do
        out="$tmp/run-$1-$2-$3-$backend"
        # shellcheck disable=SC2086
        expect 0 "score, select, train on $backend, $1 ranks, pp $2, ep $3" $mpirun "$1" "$esft" \
            "$demo" "phase=[score,select,train]" "run.output_dir=$out" "run.backend=$backend" \
            $common $train "parallel.pp=$2" "parallel.ep=$3"
        cat "$tmp/out" "$tmp/err" >"$tmp/log"
        contains "$tmp/log" "train: backend $backend" "the log names the backend"
        # shellcheck disable=SC2086
        expect 0 "eval of the adapter on $backend, $1 ranks, pp $2, ep $3" $mpirun "$1" "$esft" \
            "$demo" phase=eval "run.output_dir=$out/eval" "run.backend=$backend" $common \
            "eval.adapter=$out/adapter/adapter.safetensors" "parallel.pp=$2" "parallel.ep=$3"
    done
    cpu="$tmp/run-$1-$2-$3-cpu"
    sim="$tmp/run-$1-$2-$3-cpu-devsim"
    a=$(numbers "$cpu/metrics.jsonl")
    b=$(numbers "$sim/metrics.jsonl")
    [ -n "$a" ] && [ "$a" = "$b" ] && ok ||
        fail "layout $layout: the simulator's curve differs: cpu [$a] simulator [$b]"
    choice "$cpu/expert_config.json" >"$tmp/c1"
    choice "$sim/expert_config.json" >"$tmp/c2"
    [ -s "$tmp/c1" ] && cmp -s "$tmp/c1" "$tmp/c2" && ok ||
        fail "layout $layout: select chose differently from the simulator's statistics"
    cmp -s "$cpu/adapter/adapter.safetensors" "$sim/adapter/adapter.safetensors" && ok ||
        fail "layout $layout: the adapters differ"
    a=$(grep -o -E '"(loss|accuracy|perplexity|tokens)": [^,}]*' "$cpu/eval/eval.json" | tr '\n' ' ')
    b=$(grep -o -E '"(loss|accuracy|perplexity|tokens)": [^,}]*' "$sim/eval/eval.json" | tr '\n' ' ')
    [ -n "$a" ] && [ "$a" = "$b" ] && ok || fail "layout $layout: eval: cpu [$a] simulator [$b]"
done

# train.recompute (activation checkpointing): the same curve and adapter bit for bit,
# on the CPU and on the simulator, with EP (the recomputed MoE layers exchange their rows
# again) and PP; the simulator's buffers (its own count, backend_peak_mib) shrink.
peak() { # the largest backend_peak_mib of a metrics file
    grep -o '"backend_peak_mib": [0-9.]*' "$1" | sed 's/.*: //' | sort -n | tail -n 1
}
for layout in "1 1 1" "2 1 2" "4 2 2"; do
    set -- $layout
    for backend in cpu cpu-devsim; do
        base="$tmp/run-$1-$2-$3-$backend"
        out="$tmp/recompute-$1-$2-$3-$backend"
        # shellcheck disable=SC2086
        expect 0 "train with recompute on $backend, $1 ranks, pp $2, ep $3" $mpirun "$1" "$esft" \
            "$demo" "phase=[train]" "run.output_dir=$out" "run.backend=$backend" $common $train \
            "train.expert_config=$base/expert_config.json" train.recompute=true \
            "parallel.pp=$2" "parallel.ep=$3"
        a=$(numbers "$base/metrics.jsonl")
        b=$(numbers "$out/metrics.jsonl")
        [ -n "$a" ] && [ "$a" = "$b" ] && ok ||
            fail "layout $layout on $backend: recompute changed the curve: [$a] against [$b]"
        cmp -s "$base/adapter/adapter.safetensors" "$out/adapter/adapter.safetensors" && ok ||
            fail "layout $layout on $backend: recompute changed the adapter"
    done
    kept=$(peak "$tmp/run-$1-$2-$3-cpu-devsim/metrics.jsonl")
    less=$(peak "$tmp/recompute-$1-$2-$3-cpu-devsim/metrics.jsonl")
    awk -v a="$kept" -v b="$less" 'BEGIN { exit !(a > 0 && b > 0 && b < a) }' && ok ||
        fail "layout $layout: the simulator's peak with recompute ($less MiB) is not below without ($kept MiB)"
    echo "# layout $layout: simulator's peak buffers $kept MiB kept, $less MiB recomputed"
done

# Resume on the simulator: stop after step 3 (train.steps 3), then go on to step 6 from
# its checkpoint; the curve is the uninterrupted CPU run's.
out="$tmp/resume"
config="train.expert_config=$tmp/run-1-1-1-cpu/expert_config.json"
# shellcheck disable=SC2086
expect 0 "train to step 3 on the simulator" "$esft" "$demo" phase=train "run.output_dir=$out" \
    run.backend=cpu-devsim $common $train train.steps=3 "$config"
# shellcheck disable=SC2086
expect 0 "resume to step 6 on the simulator" "$esft" "$demo" phase=train "run.output_dir=$out" \
    run.backend=cpu-devsim $common $train "$config"
cat "$tmp/out" "$tmp/err" >"$tmp/log"
contains "$tmp/log" "resuming from" "the second run resumes"
same_curve "$tmp/run-1-1-1-cpu/metrics.jsonl" "$out/metrics.jsonl" 0 && ok ||
    fail "resumed on the simulator: the curve is not the CPU's uninterrupted one"

test_end test-devsim

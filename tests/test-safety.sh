#!/bin/sh
# test-safety: settings a user meets in the first hour, each either working or refused
# early with a clear message (the run-safety checks): eval_every and checkpoint_every 0,
# samples longer than data.seq_len in score, train and eval, steps without loss-bearing
# targets or with a non-finite loss, metrics lines that are always JSON, a finished
# training run again, expert configs with nothing to train, sweep members that keep to
# their own directories, and the loss picture of a stopped and resumed training.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin safety
demo="$src/input/demo.yaml"
d="$tmp/demo"
# shellcheck disable=SC2086
expect 0 "demo up to select" "$esft" "$demo" "phase=[init,prepare,score,select]" "run.output_dir=$d" \
    "model.path=$d/model" "prepare.output=$d/data.h5" "data.path=$d/data.h5" \
    "prepare.inputs=[$src/input/data/demo.jsonl]"
common="model.path=$d/model data.path=$d/data.h5 train.expert_config=$d/expert_config.json"
short="train.steps=4 train.global_batch=4"

# No bare NaN or infinity in any metrics line (JSON has neither).
json_numbers() { # METRICS DESCRIPTION
    if grep -E -q ': -?(nan|inf)' "$1"; then fail "$2: a non-JSON number in $1: $(grep -E ': -?(nan|inf)' "$1" | head -n 1)"; else ok; fi
}

# eval_every 0 (never) and checkpoint_every 0 (only at the end): no division by zero.
# shellcheck disable=SC2086
expect 0 "eval_every 0, checkpoint_every 0" "$esft" "$demo" phase=train "run.output_dir=$d/zero" \
    $common $short train.eval_every=0 train.checkpoint_every=0
[ -s "$d/zero/adapter/adapter.safetensors" ] && ok || fail "eval_every 0: no adapter"
n=$(find "$d/zero/checkpoints" -name 'step-*.h5' | wc -l)
[ "$n" = 1 ] && ok || fail "checkpoint_every 0: $n checkpoints, want the final one"
lacks "$d/zero/metrics.jsonl" '"event": "eval"' "eval_every 0"

# Samples longer than data.seq_len: every phase cuts them, says so, and runs.
expect 0 "prepare, samples longer than seq_len" "$esft" "$demo" phase=prepare "run.output_dir=$d/long" \
    "prepare.output=$d/long/data.h5" "prepare.inputs=[$src/input/data/demo.jsonl]" data.seq_len=32
contains "$tmp/err" "samples are longer than data.seq_len (32): score, train and eval will cut them" \
    "prepare, long samples"
# shellcheck disable=SC2086
expect 0 "score, samples longer than seq_len" "$esft" "$demo" phase=score "run.output_dir=$d/long" \
    $common data.seq_len=32
contains "$tmp/err" "longer than data.seq_len (32)" "score, long samples"
# shellcheck disable=SC2086
expect 0 "train, samples longer than seq_len" "$esft" "$demo" phase=train "run.output_dir=$d/long" \
    $common $short data.seq_len=32
contains "$tmp/err" "are longer than data.seq_len (32) and are cut" "train, long samples"
contains "$d/long/metrics.jsonl" '"samples_cut": ' "train, long samples"
# shellcheck disable=SC2086
expect 0 "eval, samples longer than seq_len" "$esft" "$demo" phase=eval "run.output_dir=$d/long-eval" \
    $common data.seq_len=32

# A cut that removes every loss-bearing target: an error, not a run of NaN steps.
# shellcheck disable=SC2086
expect 1 "no loss-bearing targets" "$esft" "$demo" phase=train "run.output_dir=$d/empty" $common \
    $short data.seq_len=3
contains "$tmp/err" "step 1 stopped the run: its global batch holds no loss-bearing target" \
    "no loss-bearing targets"
absent "$d/empty/adapter" "no loss-bearing targets"
json_numbers "$d/empty/metrics.jsonl" "no loss-bearing targets"
# ... or, when asked, skipped and counted
# shellcheck disable=SC2086
expect 0 "no loss-bearing targets, skipped" "$esft" "$demo" phase=train "run.output_dir=$d/skip" \
    $common $short data.seq_len=3 train.bad_steps=skip train.eval_every=0
contains "$d/skip/metrics.jsonl" '"skipped_steps": 4' "bad steps skipped"
json_numbers "$d/skip/metrics.jsonl" "bad steps skipped"

# A loss that becomes non-finite (a learning rate of 1e30): stopped at step 2 with the
# step-1 model checkpointed, exit status 1.
# shellcheck disable=SC2086
expect 1 "diverging run" "$esft" "$demo" phase=train "run.output_dir=$d/diverge" $common $short \
    train.lr=1e30 train.checkpoint_every=100
contains "$tmp/err" "step 2 stopped the run: its loss is not finite" "diverging run"
[ -f "$d/diverge/checkpoints/step-00000001.h5" ] && ok || fail "diverging run: no step-1 checkpoint"
json_numbers "$d/diverge/metrics.jsonl" "diverging run"

# A finished training run again: nothing to train, said so, records stay JSON.
# shellcheck disable=SC2086
expect 0 "finished run again" "$esft" "$demo" phase=train "run.output_dir=$d/zero" $common $short \
    train.eval_every=0 train.checkpoint_every=0
contains "$tmp/out" "nothing to train" "finished run again"
json_numbers "$d/zero/metrics.jsonl" "finished run again"

# Expert configs with nothing to train, or shared experts the model lacks: refused
# before training (and before anything is written).
printf '{"experts": {}, "shared_experts": false, "non_expert_modules": false}\n' >"$tmp/none.json"
# shellcheck disable=SC2086
expect 2 "empty expert config" "$esft" "$demo" phase=train "run.output_dir=$d/none" $common $short \
    "train.expert_config=$tmp/none.json"
contains "$tmp/err" "$tmp/none.json: selects nothing to train" "empty expert config"
absent "$d/none" "empty expert config"
printf '{"experts": {"0": [1]}, "shared_experts": true, "non_expert_modules": false}\n' >"$tmp/shared.json"
# shellcheck disable=SC2086
expect 2 "shared experts the model lacks" "$esft" "$demo" phase=train "run.output_dir=$d/shared" \
    $common $short "train.expert_config=$tmp/shared.json"
contains "$tmp/err" "has no shared experts" "shared experts the model lacks"

# README's sweep: members named on the command line get their own directories under
# the deck's run.output_dir default (out/{name}), so none resumes another's checkpoint.
for member in a b; do
    # shellcheck disable=SC2086
    (cd "$tmp" && "$esft" "$demo" phase=train $common $short "run.name=sweep-$member" \
        "train.lr=$([ $member = a ] && echo 3e-3 || echo 1e-3)" run.output_dir=runs/{name} \
        >"$tmp/out" 2>"$tmp/err")
    [ $? = 0 ] && ok || fail "sweep member $member: $(tail -n 3 "$tmp/err")"
    lacks "$tmp/out" "resuming from" "sweep member $member"
    [ -s "$tmp/runs/sweep-$member/adapter/adapter.safetensors" ] && ok || fail "sweep member $member: no adapter"
done

# The loss picture of a training run stopped at step 4 and resumed to step 8 shows all
# eight steps, and the summary counts this run's four.
# shellcheck disable=SC2086
expect 0 "first part" "$esft" "$demo" phase=train "run.output_dir=$d/parts" $common $short \
    train.checkpoint_every=2 train.eval_every=2
# shellcheck disable=SC2086
expect 0 "second part" "$esft" "$demo" phase=train "run.output_dir=$d/parts" $common $short \
    train.checkpoint_every=2 train.eval_every=2 train.steps=8
contains "$tmp/out" "this run 4 steps" "second part"
points=$(grep -o '<polyline[^>]*points="[^"]*"' "$d/parts/loss.svg" | head -n 1 | sed 's/.*points="//; s/"$//' | wc -w)
[ "$points" = 8 ] && ok || fail "loss.svg after a resume: $points training points, want 8"
contains "$tmp/out" "best validation loss" "second part summary"

# Threads on a shared node: the passive OpenMP wait policy unless the user chose one, and
# no more threads on a node's ranks together than it has cores.
env -u OMP_WAIT_POLICY -u GOMP_SPINCOUNT "$esft" --version >"$tmp/out" 2>&1
contains "$tmp/out" "wait policy passive" "default wait policy"
OMP_WAIT_POLICY=active "$esft" --version >"$tmp/out" 2>&1
contains "$tmp/out" "wait policy active" "the user's wait policy"
# shellcheck disable=SC2086
expect 0 "2 ranks, threads not set" env -u OMP_NUM_THREADS $mpirun 2 "$esft" "$demo" phase=score \
    "run.output_dir=$d/threads2" $common
cores=$(nproc)
want=$((cores / 2))
[ "$want" -lt 1 ] && want=1
contains "$d/threads2/metrics.jsonl" "\"threads\": $want, \"host\"" "2 ranks share the node's $cores cores"

test_end test-safety
